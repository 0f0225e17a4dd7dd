"""Raw medical images (DICOM, whole-slide images, photos, MedMNIST npz) to modality-tagged Parquet shards."""
