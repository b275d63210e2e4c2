"""Data sets in and out of nnU-Net's layout, in one place: converters and generators, no training or metrics.

    brats        a BraTS glioma training folder (2021 or 2023 naming) -> nnU-Net raw dataset (`convert-brats`)
    hippocampus  the MSD Task04 hippocampus folder -> nnU-Net raw dataset
    phantom      synthetic BraTS-like cases, written as a BraTS folder for `brats.convert_brats`
    medmnist     MedMNIST v2 .npz files as in-memory splits with batching for classification

The modules are not imported here: each pulls in its own heavy dependencies (SimpleITK, torch) when used.
"""
