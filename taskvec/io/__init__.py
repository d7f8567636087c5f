"""Streaming safetensors I/O: headers, chunked reads into reused buffers, sharded writes."""
