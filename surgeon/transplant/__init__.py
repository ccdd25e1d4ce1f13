"""Tokenizer transplantation: give a model another model's tokenizer without training.

* :func:`transplant` — the step (read lazily, rebuild embedding rows, write atomically);
* :mod:`.vocab` — token matching across byte-level BPE / SentencePiece / WordPiece by bytes and roles;
* :mod:`.omp` — batched orthogonal matching pursuit in torch;
* :mod:`.init` — OMP and the ``mean`` / ``zero`` / ``subword`` baselines.
"""
from .init import METHODS
from .omp import batch_omp, omp_exact, omp_screened
from .transplant import find_embeddings, plan_transplant, transplant
from .vocab import TokenizerInfo, VocabMatch, load_tokenizer_info, match_vocabularies

__all__ = ["METHODS", "transplant", "plan_transplant", "find_embeddings", "batch_omp", "omp_exact", "omp_screened",
           "TokenizerInfo", "VocabMatch", "load_tokenizer_info", "match_vocabularies"]
