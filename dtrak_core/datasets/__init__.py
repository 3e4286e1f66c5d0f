"""Datasets: the emoji3 builder and a generic image-folder loader."""

from dtrak_core.datasets.imagefolder import DatasetError, ImageFolderDataset, load_image_folder

__all__ = ["DatasetError", "ImageFolderDataset", "load_image_folder"]
