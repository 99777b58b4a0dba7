"""Framework adapters: hvdquant codecs in the shapes frameworks expect (Horovod compression and
optimizer, the DDP hook)."""
