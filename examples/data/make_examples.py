"""Writes the two small example datasets of the README's "Your own data" section, from
sentences written for this repository (no third-party corpus): deterministic, so the files
committed beside this script are exactly what it writes.

- support_tickets.csv: 360 support messages in three classes (billing, technical, account)
  with string labels and a `customer` column (12 customers) for a natural partition;
- instructions.jsonl: 240 small instructions with an input and a response (word and number
  exercises), with a `category` column.

    python examples/data/make_examples.py
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent

OPENERS = ["Hello,", "Hi team,", "Good morning,", "Hey,", "Dear support,", ""]
CLOSERS = ["Thanks.", "Please help.", "Any idea?", "Regards.", "Thank you in advance.", ""]
TOPICS = {
    "billing": [
        "I was charged twice for my {plan} subscription this month",
        "my invoice for {month} shows the wrong amount",
        "can I get a refund for the {plan} plan I cancelled",
        "the card payment for {month} failed but the money left my account",
        "please send me a receipt for the {month} payment",
        "why did the price of the {plan} plan go up",
        "I want to switch my {plan} plan to yearly billing",
        "there is a charge I do not recognise on my {month} statement",
    ],
    "technical": [
        "the {app} app crashes every time I open the {screen} screen",
        "I cannot upload files larger than {size} in the {app} app",
        "the {screen} page loads forever after the latest update",
        "sync between the {app} app and the website stopped working",
        "I get an error code {code} when I export my data",
        "notifications do not arrive on my phone since {month}",
        "the {screen} screen is blank on my tablet",
        "search in the {app} app returns no results at all",
    ],
    "account": [
        "I forgot my password and the reset email never arrives",
        "how do I change the email address on my account",
        "please delete my account and all my data",
        "I want to add a second user to my {plan} account",
        "my account was locked after too many login attempts",
        "can I merge my two accounts into one",
        "how do I turn on two-factor login for my account",
        "I need to change the name shown on my profile",
    ],
}
FILL = {
    "plan": ["basic", "family", "pro", "team", "student"],
    "month": ["January", "March", "May", "July", "September", "November"],
    "app": ["desktop", "mobile", "web", "Android", "iPhone"],
    "screen": ["settings", "calendar", "reports", "inbox", "dashboard"],
    "size": ["10 MB", "50 MB", "100 MB", "1 GB"],
    "code": ["E102", "E417", "E503", "E221"],
}


def tickets(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for i in range(360):
        label = ["billing", "technical", "account"][i % 3]
        body = rng.choice(TOPICS[label]).format(**{k: rng.choice(v) for k, v in FILL.items()})
        text = " ".join(p for p in (rng.choice(OPENERS), body[0].upper() + body[1:] + ".", rng.choice(CLOSERS)) if p)
        rows.append({"text": text, "label": label, "customer": f"customer-{rng.randrange(12):02d}"})
    return rows


WORDS = [
    "river",
    "candle",
    "garden",
    "window",
    "pencil",
    "rocket",
    "forest",
    "bottle",
    "mirror",
    "ladder",
    "basket",
    "saddle",
    "pillow",
    "tunnel",
    "button",
    "planet",
    "feather",
    "blanket",
    "harbor",
    "lantern",
]


def instructions(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for i in range(240):
        kind = i % 4
        word = rng.choice(WORDS)
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        if kind == 0:
            rows.append(
                {
                    "instruction": "Write the word backwards.",
                    "input": word,
                    "output": word[::-1],
                    "category": "spelling",
                }
            )
        elif kind == 1:
            rows.append(
                {
                    "instruction": "Write the word in capital letters.",
                    "input": word,
                    "output": word.upper(),
                    "category": "spelling",
                }
            )
        elif kind == 2:
            rows.append(
                {
                    "instruction": "Add the two numbers.",
                    "input": f"{a} and {b}",
                    "output": str(a + b),
                    "category": "arithmetic",
                }
            )
        else:
            rows.append(
                {
                    "instruction": "Which number is larger?",
                    "input": f"{a} or {b}",
                    "output": str(max(a, b)),
                    "category": "arithmetic",
                }
            )
    return rows


def main() -> None:
    rng = random.Random(0)
    with (HERE / "support_tickets.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label", "customer"])
        writer.writeheader()
        writer.writerows(tickets(rng))
    with (HERE / "instructions.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in instructions(rng))


if __name__ == "__main__":
    main()
