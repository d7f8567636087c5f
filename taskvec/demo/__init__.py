"""`taskvec demo`: the whole detoxification method offline on a small model."""
