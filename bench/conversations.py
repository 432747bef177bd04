"""Realistic chat conversations for benchmarks on a real model: short answers and long ones, multi-turn chats,
system prompts, code, CJK and emoji, so that lengths are as skewed as real SFT data (about 30 to 700 tokens)."""

from __future__ import annotations

import random

QA = [
    ("What is the capital of Australia?", "The capital of Australia is Canberra, not Sydney as many people assume."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Translate 'good morning' into French.", "Bonjour."),
    ("Is 97 a prime number?", "Yes. 97 has no divisors other than 1 and itself, so it is prime."),
    ("用一句话介绍长城。", "长城是中国古代修建的军事防御工程，东西绵延上万里，是世界上最著名的建筑之一。"),
    ("Give me an emoji for a rainy day.", "🌧️ works well, or ☔ if you want the umbrella."),
    ("What does HTTP status 404 mean?", "404 means Not Found: the server is reachable but has nothing at that URL."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen wrote it; it was first published in 1813."),
]

LONG = [
    (
        "Explain how a hash table works, as if to a new programmer.",
        "A hash table stores key-value pairs so that you can find a value by its key in roughly constant time. "
        "It keeps an array of buckets. To insert a pair, it runs the key through a hash function, which turns the "
        "key into a large integer, and takes that integer modulo the number of buckets to pick a bucket. The pair "
        "goes into that bucket. To look a key up, it hashes the key the same way and only searches that one "
        "bucket, instead of the whole table.\n\nTwo different keys can land in the same bucket; this is called a "
        "collision. The two common fixes are chaining, where each bucket holds a small list of pairs, and open "
        "addressing, where the table probes the next free slot. Either way, lookups stay fast as long as the "
        "buckets stay short, so the table grows (usually doubling) and re-inserts everything once it is about "
        "two-thirds full. That resize is expensive, but it happens rarely enough that the average cost per "
        "insertion stays constant. Python's dict and JavaScript's Map are hash tables.",
    ),
    (
        "Write a Python function that returns the n-th Fibonacci number, and explain its complexity.",
        'Here is an iterative version:\n\n```python\ndef fibonacci(n: int) -> int:\n    """Return the n-th '
        'Fibonacci number, with fibonacci(0) == 0."""\n    if n < 0:\n        raise ValueError(\'n must be '
        "non-negative')\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```\n\n"
        "It runs in O(n) time and O(1) extra memory: one loop iteration per step, and only two numbers kept. "
        "The naive recursive version, `fib(n - 1) + fib(n - 2)`, recomputes the same values over and over and "
        "takes exponential time, roughly O(1.6^n). If you need very large n, the matrix-power or fast-doubling "
        "method computes it in O(log n) arithmetic operations, although the numbers themselves grow to about "
        "0.7 n bits, so each multiplication gets slower as n grows.",
    ),
    (
        "What are the main causes of inflation?",
        "Economists usually group the causes of inflation into three kinds.\n\n1. Demand-pull inflation: "
        "households, firms and the government together want to buy more than the economy can produce, so "
        "sellers raise prices. Low interest rates, large fiscal stimulus or a credit boom can all push demand "
        "up.\n2. Cost-push inflation: producing goods becomes more expensive, for example when oil prices jump, "
        "when supply chains break down, or when wages rise faster than productivity. Firms pass the higher "
        "costs on to customers.\n3. Built-in inflation: once people expect prices to keep rising, workers ask "
        "for higher wages and firms raise prices in advance, and the expectation feeds itself.\n\nIn the long "
        "run, sustained inflation also needs the money supply to grow faster than output; that is why central "
        "banks fight it by raising interest rates, which cools borrowing and spending. In practice several of "
        "these causes act at once, and their weights differ from one episode to the next.",
    ),
    (
        "Summarise the plot of Romeo and Juliet in a paragraph.",
        "In Verona, two noble families, the Montagues and the Capulets, are locked in a bitter feud. Romeo, a "
        "Montague, sneaks into a Capulet party and falls in love with Juliet, the Capulets' daughter. They "
        "marry in secret with the help of Friar Laurence. Soon after, Juliet's cousin Tybalt kills Romeo's "
        "friend Mercutio, and Romeo kills Tybalt in revenge, for which he is banished. Juliet's parents, "
        "unaware of her marriage, arrange for her to marry Paris. To escape, she takes a potion from the friar "
        "that makes her appear dead, planning to rejoin Romeo later. The message explaining the plan never "
        "reaches Romeo; believing Juliet dead, he poisons himself at her tomb. Juliet wakes, finds him dead, "
        "and stabs herself. Their deaths finally reconcile the two families.",
    ),
    (
        "How do I undo the last git commit but keep my changes?",
        "Run `git reset --soft HEAD~1`. It moves the branch back by one commit and leaves the changes of that "
        "commit staged, so you can edit and commit them again. If you also want them unstaged, use "
        "`git reset HEAD~1` (the default, `--mixed`). Avoid `--hard`, which throws the changes away. If you "
        "have already pushed the commit, prefer `git revert HEAD`, which adds a new commit that undoes it "
        "instead of rewriting history that others may have pulled.",
    ),
    (
        "请解释一下什么是机器学习，并举一个例子。",
        "机器学习是人工智能的一个分支，它让计算机从数据中自动学习规律，而不是由程序员逐条编写规则。"
        "通常的做法是：先收集大量带有答案的样本，再让模型调整自己的参数，使它在这些样本上的预测尽量准确，"
        "最后用它去预测从未见过的新数据。\n\n举个例子：垃圾邮件过滤。我们给模型看成千上万封已经标注为"
        "“垃圾邮件”或“正常邮件”的信件，模型会发现某些词语、发件人和格式更常出现在垃圾邮件中。"
        "训练完成后，新邮件到达时，模型就能根据学到的规律判断它是不是垃圾邮件。",
    ),
]

SYSTEM = [
    "You are a concise assistant. Answer in at most two sentences.",
    "You are a friendly tutor for high-school students. Explain step by step.",
    "You are a senior software engineer reviewing code. Be direct.",
]

FOLLOW_UPS = [
    ("Can you make that shorter?", "Sure: in short, the idea is to keep only what matters and drop the rest."),
    ("Thanks! 😊", "You're welcome! 😊 Let me know if you have more questions."),
    ("Could you give an example?", "For example, imagine sorting a deck of cards by repeatedly picking the lowest."),
    ("Why is that?", "Because each step removes one case, so the work shrinks until nothing is left to do."),
]


def realistic_conversations(n: int = 32, seed: int = 0) -> list[list[dict]]:
    """`n` conversations mixing one-line answers, long explanations, code, CJK, emoji, system prompts and
    follow-up turns, drawn with a fixed seed."""
    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if i % 4 == 1 else []
        turns = 1 + (i % 3 == 2) + (i % 7 == 6)
        for turn in range(turns):
            if turn == 0:
                question, answer = LONG[i // 2 % len(LONG)] if i % 2 else QA[i // 2 % len(QA)]
            elif i % 5 == 4:
                question, answer = LONG[(i + turn) % len(LONG)]
            else:
                question, answer = rng.choice(FOLLOW_UPS + QA)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append(messages)
    return conversations
