"""Fixed-length token chunks for the Doc-to-LoRA baseline: the "atoms" of `d2l` (DESIGN §3, §13).

A chunk is a run of `chunk_tokens` consecutive tokens of the one document encoding (0 = the whole
document as one chunk). Chunks go through the same AtomizedDocument/bank path as atoms, so evaluation
treats every method alike; their type is `other`.
"""

from doc2atom_jax.atoms import atomize
from doc2atom_jax.errors import UserError


def chunk_document(text: str, doc_id: str, tokenizer, chunk_tokens: int = 0) -> atomize.AtomizedDocument:
  if not text.strip():
    raise UserError(f"document {doc_id} is empty: nothing to compile")
  if chunk_tokens < 0:
    raise UserError(f"chunk_tokens must be >= 0 (0 = whole document), got {chunk_tokens}")
  enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
  offsets = [(s, e) for s, e in enc["offset_mapping"] if e > s]
  size = chunk_tokens or len(offsets)
  spans = []
  for i in range(0, len(offsets), size):
    start, end = offsets[i][0], offsets[min(i + size, len(offsets)) - 1][1]
    if text[start:end].strip():
      spans.append((start, end))
  return atomize.atomize_given(text, doc_id, tokenizer, spans, types=["other"] * len(spans))
