"""Loads an exported model directory in Hugging Face transformers and in finch-optax's models, and compares them on a
conversation rendered with the export's own chat template: the tokens, the rendered text and the logits.

    .venv/bin/python scripts/check_export.py runs/smollm2-chat/hf [--message "Where was Mailin Trinlar born?"]

Needs torch + transformers, which `make install` leaves out: `make install-test`, or `pip install -c constraints.txt
-e '.[torch]'` in the checkout. Exit code 1 when anything differs beyond float32 noise, 2 when torch is missing.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import models
from train.chat_template import ChatTemplate

try:
    import torch
    import transformers
except ImportError as e:
    print(
        f"check_export.py compares with Hugging Face transformers: {e.name} is not installed; run `make install-test` "
        "in the finch-optax checkout, or there `pip install -c constraints.txt -e '.[torch]'`",
        file=sys.stderr,
    )
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="an exported model directory (e.g. runs/NAME/hf)")
    parser.add_argument("--message", default="Where was Mailin Trinlar born?", help="the user message to render")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |logit difference|")
    args = parser.parse_args(argv)

    ours, tokenizer = models.load(f"hf:{args.directory}", dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(args.directory, dtype=torch.float32).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(args.directory)
    messages = [{"role": "user", "content": args.message}]
    if tokenizer.chat_template:
        text = ChatTemplate.for_model(tokenizer).render(messages, add_generation_prompt=True)
        same_text = text == their_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text, same_text = args.message, True
    ids = tokenizer.encode(text)
    same_ids = ids == their_tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = np.asarray([ids], np.int32)
    with torch.no_grad():
        reference = theirs(torch.tensor(tokens)).logits.float().numpy()
    diff = float(np.abs(np.asarray(ours(tokens)) - reference).max())
    print(f"{args.directory}: {len(ids)} tokens of {text!r}")
    print(f"  chat template renders the same in transformers: {same_text}")
    print(f"  token ids the same in transformers: {same_ids}")
    print(f"  max |logit difference| ours vs transformers: {diff:.2e} (logits up to {np.abs(reference).max():.1f})")
    ok = same_text and same_ids and diff <= args.tolerance
    print("  OK" if ok else "  MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
