"""data: the collection store, image sources, safe decoding and the concept world."""
