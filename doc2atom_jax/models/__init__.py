"""Frozen base decoders with a per-example adapter hook, loading, and KV-cache generation."""

from doc2atom_jax.models.adapter import Adapter, LoRA
from doc2atom_jax.models.base import BaseModel, load, valid_names
from doc2atom_jax.models.config import DecoderConfig
from doc2atom_jax.models.decoder import Decoder, DecoderOutput, KVCache, forward, init_cache

__all__ = ["Adapter", "BaseModel", "Decoder", "DecoderConfig", "DecoderOutput", "KVCache", "LoRA", "forward",
           "init_cache", "load", "valid_names"]
