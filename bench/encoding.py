"""Throughput of the response mask (`ConversationEncoder.encode`) on real chat templates, CPU only.

    PYTHONPATH=src:. python bench/encoding.py --conversations 100

Each conversation has a system turn and four user/assistant exchanges (about 1,400 tokens); the templates
are TRL's originals loaded into one byte-level BPE tokenizer, as in tests/test_templates.py. Encoding renders
every conversation twice (as it is and with markers) and tokenizes it once with offsets.
"""

from __future__ import annotations

import argparse
import random
import time

from poft.chat import ConversationEncoder
from poft.demo.builders import bpe_tokenizer
from tests.real_templates import tokenizer_for

WORDS = "the of and to in is that for it as with was on be by this are from or an at which but not".split()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--templates", nargs="+", default=["llama3_1", "qwen2_5", "qwen3", "gemma3", "phi3"])
    args = parser.parse_args()
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    conversations = []
    for _ in range(args.conversations):
        messages = [{"role": "system", "content": text(20)}]
        for _ in range(4):
            messages += [{"role": "user", "content": text(60)}, {"role": "assistant", "content": text(250)}]
        conversations.append(messages)
    base = bpe_tokenizer([text(50) for _ in range(200)], vocab_size=600, chat_template=None)
    print("| template | conversations/s | tokens/s |\n| --- | --- | --- |")
    for name in args.templates:
        encoder = ConversationEncoder(tokenizer_for(base, name))
        start = time.perf_counter()
        tokens = sum(len(encoder.encode(messages).input_ids) for messages in conversations)
        seconds = time.perf_counter() - start
        print(f"| {name} | {len(conversations) / seconds:,.0f} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    main()
