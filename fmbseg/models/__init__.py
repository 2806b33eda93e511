"""Model adapters: one small interface per role (CLIP, SAM, DINOv2); nothing else touches the libraries."""
