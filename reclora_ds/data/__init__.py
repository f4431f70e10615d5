"""Raw readers, preprocessing and the processed-dataset format."""
