"""Concept-world models (a small CLIP, pairnet, an autoencoder, a caption decoder), their training and weights.

The generator and vocabulary they are trained on live in ``t2c.data.world``. Importing this package or
``t2c.indexer.world.models`` does not import torch; building a model does. ``t2c world train`` runs
:func:`t2c.indexer.world.train.train_all`.
"""
