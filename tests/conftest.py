"""Settings for the whole test suite."""
import os

# OpenMP worker threads that spin while they wait make every one of the scan's many small operations 5-50x
# slower as soon as another process (nnU-Net's workers, a second test) wants a core; passive waiting avoids it.
# Set before torch is imported; nnU-Net subprocesses started by the tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
