# The folder users point nnUNet_extTrainer at (`nnunet-segmamba env` prints the line). nnU-Net imports the
# modules here by bare name; each one only re-exports trainer classes from nnunet_segmamba.training.
