"""An offline CLIP BPE tokenizer identical to Stable Diffusion's, built from open_clip's merges.

SD-1.x/2.x use OpenAI CLIP's BPE: vocabulary = the 256 byte symbols, the same 256 with the
end-of-word marker ``</w>``, one entry per merge (48,894 merges), then ``<|startoftext|>`` and
``<|endoftext|>`` — 49,408 entries. open_clip ships the merges file, so no hub is needed.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def clip_bpe_merges() -> list[str]:
    """The 48,894 merges SD's tokenizer uses, read from the file shipped inside open_clip."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n_merges = VOCAB_SIZE - 256 * 2 - 2
    merges = lines[1 : n_merges + 1]  # line 0 is a version header
    if len(merges) != n_merges:
        raise RuntimeError(f"open_clip's BPE file has {len(merges)} merges, expected {n_merges}")
    return merges


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write vocab.json and merges.txt of SD's CLIP tokenizer into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = clip_bpe_merges()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"built a vocabulary of {len(vocab)} entries, expected {VOCAB_SIZE}")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


def build_clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """SD's CLIPTokenizer, offline. SD-1.x pads with <|endoftext|>; SD-2.x pads with '!'."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        # from_pretrained on the two files works across transformers 4.x (slow, file-based) and
        # 5.x (tokenizers-backed) constructors.
        return CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=MAX_LENGTH,
            bos_token=BOS,
            eos_token=EOS,
            unk_token=EOS,
            pad_token=pad_token,
        )
