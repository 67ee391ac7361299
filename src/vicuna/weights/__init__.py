"""Model weights on disk: downloads, Meta -> Hugging Face conversion, delta weights and sha256 manifests."""
