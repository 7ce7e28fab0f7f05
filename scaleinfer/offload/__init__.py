"""ZeRO-Inference: decoder-layer weights kept in host memory or NVMe files and streamed to the device.

layout.py packs a layer's parameters into one flat byte buffer; host_store.py and nvme_store.py keep every
layer's bytes; buffers.py allocates aligned (and pinned) host memory; streamer.py copies a layer into a
ring of device slots ahead of its compute; loader.py builds a model whose layers live in a store.
"""
