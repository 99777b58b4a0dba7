"""Framework adapters: hvdquant codecs in the shapes frameworks expect (Horovod so far)."""
