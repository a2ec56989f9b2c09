"""`python -m benchmarks.bounce_detection [--bounces DIR] [--generated N]`: how well the
plain-bounce scan (adapters/smtp/dsn.plain_bounce, flufl.bounce's detectors) tells bounces
from ordinary personal mail, and what it costs. A measurement, not a test.

- Bounces: flufl.bounce's own corpus, the `tests/data/*.txt` of its source distribution (the
  wheel leaves it out): `pip download --no-deps --no-binary :all: flufl.bounce==6.0.0`, unpack,
  pass `--bounces flufl_bounce-6.0.0/tests/data`. Each file is also judged as the filter
  would with its From as envelope sender: exempt by the header rules alone (before this scan),
  and with the scan's flag (after).
- Ordinary mail: Python's own email test messages (`test/test_email/data/msg_*.txt` of the
  standard library's test package, when installed) less the delivery reports among them, and
  N generated personal messages (seeded): replies and forwards with quoting, signatures with
  addresses, multipart/alternative, attachments and forwards as attachments (message/rfc822),
  GroupWise/NTMail/Exchange/Outlook X-Mailers, and talk of failed deliveries, returned
  parcels and bounced addresses in English and French.
"""

from __future__ import annotations

import argparse
import base64
import email
import email.policy
import logging
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path

from sourceauth.adapters.smtp.bounce_cues import may_be_bounce
from sourceauth.adapters.smtp.dsn import plain_bounce, prepared_for_detectors
from sourceauth.adapters.smtp.inbound import parse_headers
from sourceauth.engine.policy import classify

NAMES = [
    "Anna Berg",
    "Tom Price",
    "Marie Dubois",
    "Jörg Weiß",
    "Priya Nair",
    "Li Wei",
    "Carlos Ruiz",
    "Jane Roe",
    "Sam Okafor",
    "Ines Costa",
]
DOMAINS = [
    "gmail.test",
    "county.test",
    "uni-bonn.test",
    "harbourbank.test",
    "societe.test",
    "example.org",
    "mail.test",
]
MAILERS = [
    "",
    "",
    "Microsoft Outlook 16.0",
    "Novell GroupWise Internet Agent 18.4.1",
    "Internet Mail Service (5.5.2653.19)",
    "Apple Mail (2.3654)",
    "Thunderbird 128.0",
    "NTMail v7.02",
]
SUBJECTS = [
    "lunch on Friday?",
    "Re: quarterly figures",
    "Fwd: parcel returned to sender",
    "delivery failed again",
    "Re: your address",
    "photos from the weekend",
    "Undelivered parcel - what now?",
    "Re: devis du 27 novembre",
    "colis non remis",
    "meeting notes",
    "Re: Re: new mailbox",
    "invoice 4471",
    "mail to Tom bounced",
]
SENTENCES = [
    "The courier says the delivery failed twice and the parcel was returned to the sender.",
    "My mail to {other} bounced, the address must have changed.",
    "Could you send me your new address? The old one no longer works.",
    "I could not deliver the documents on Tuesday, sorry.",
    "Le colis n'a pas pu être remis, le livreur repasse demain.",
    "Votre message du 27 n'a pas été remis à Marie, elle était absente.",
    "The message could not be delivered to the printer, it is out of paper again.",
    "Please find the figures attached; the recipient list is below.",
    "Your mailbox is full, said the phone company, so I am writing here instead.",
    "Error in the spreadsheet: row 12 has the wrong total.",
    "Unknown user on the shared drive again, can you reset my password?",
    "Lunch at noon? The usual place.",
    "Thanks for the photos, they are lovely.",
    "The delivery status says 'failed' but the box is on my desk.",
    "Return to sender, address unknown, as the song goes.",
    "I have updated the permanent address in the HR system.",
    "Temporary failure of the heating system; the building is closed tomorrow.",
]


def ordinary_stdlib() -> Iterator[tuple[str, bytes]]:
    try:
        import test.test_email as package  # the standard library's test package
    except ImportError:
        return
    data = Path(package.__file__).parent / "data"
    for path in sorted(data.glob("msg_*.txt")):
        raw = path.read_bytes()
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        if msg.get_content_type() == "multipart/report":
            continue  # two delivery reports are in there: not ordinary mail
        yield f"stdlib/{path.name}", raw


def _person(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    local = name.split()[0].lower().replace("ö", "oe").replace("ß", "ss")
    return name, f"{local}.{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"


def ordinary_generated(n: int, seed: int = 7) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(n):
        name, sender = _person(rng)
        _, to = _person(rng)
        _, other = _person(rng)
        msg = EmailMessage()
        msg["From"] = f"{name} <{sender}>"
        msg["To"] = to
        msg["Subject"] = rng.choice(SUBJECTS)
        msg["Date"] = format_datetime(start + timedelta(minutes=rng.randint(0, 500_000)))
        msg["Message-ID"] = make_msgid(domain=sender.split("@")[1])
        mailer = rng.choice(MAILERS)
        if mailer:
            msg["X-Mailer"] = mailer
        lines = [f"Hi {to.split('.')[0].title()},", ""]
        lines += [rng.choice(SENTENCES).format(other=other) for _ in range(rng.randint(1, 6))]
        lines += ["", "Best,", name, sender, f"+49 30 {rng.randint(1000000, 9999999)}"]
        if rng.random() < 0.4:  # a quoted earlier message
            lines += ["", f"On Mon, {other} wrote:"]
            lines += [f"> {rng.choice(SENTENCES).format(other=sender)}" for _ in range(3)]
        if rng.random() < 0.2:  # a forward
            lines += [
                "",
                "-----Original Message-----",
                f"From: {other}",
                f"To: {sender}",
                f"Subject: {rng.choice(SUBJECTS)}",
                "",
                rng.choice(SENTENCES),
            ]
        text = "\n".join(lines) + "\n"
        msg.set_content(text)
        if rng.random() < 0.3:
            msg.add_alternative(f"<html><body><p>{text}</p></body></html>", subtype="html")
        if rng.random() < 0.3:  # an attachment makes it multipart/mixed, as GroupWise sends
            blob = base64.b64encode(rng.randbytes(rng.randint(200, 4000)))
            msg.add_attachment(blob, maintype="application", subtype="pdf", filename="figures.pdf")
        if rng.random() < 0.05:  # an earlier message forwarded as an attachment
            earlier = EmailMessage()
            earlier["From"] = other
            earlier["To"] = sender
            earlier["Subject"] = rng.choice(SUBJECTS)
            earlier.set_content(rng.choice(SENTENCES).format(other=to) + "\n")
            if not msg.is_multipart() or msg.get_content_type() != "multipart/mixed":
                msg.make_mixed()
            msg.attach(_as_part(earlier))
        yield f"generated/{i}", msg.as_bytes(policy=email.policy.SMTP)


def _as_part(enclosed: EmailMessage) -> EmailMessage:
    part = EmailMessage()
    part.set_content(enclosed)  # message/rfc822
    part["Content-Disposition"] = "attachment"
    return part


def bounces(directory: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(directory.glob("*.txt")):
        yield path.name, path.read_bytes()


def judged(raw: bytes) -> tuple[bool, bool]:
    """(challenged before the scan, challenged after), with the From as envelope sender."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    sender = parseaddr(str(msg.get("From", "")))[1]
    headers = parse_headers(raw)
    before = classify(sender, headers) is None
    after = classify(sender, headers, bounce_like=plain_bounce(raw)) is None
    return before, after


def pre_filter_report(label: str, corpus: list[tuple[str, bytes]]) -> None:
    """What bounce_cues.may_be_bounce lets through to the detectors, whether any finding is
    lost by it (it must never be), and the scan's CPU per message with and without it."""
    passed = [name for name, raw in corpus if may_be_bounce(prepared_for_detectors(raw))]
    costs: dict[bool, float] = {}
    findings: dict[bool, dict[str, str]] = {}
    for on in (False, True):
        started = time.process_time()
        findings[on] = {name: plain_bounce(raw, pre_filter=on) for name, raw in corpus}
        costs[on] = (time.process_time() - started) / max(1, len(corpus))
    lost = sorted(n for n, found in findings[False].items() if found != findings[True][n])
    print(
        f"  pre-filter on {label}: {len(passed)} of {len(corpus)} passed to the detectors; "
        f"findings changed by it: {len(lost)} {lost[:10]}; CPU {costs[False] * 1e6:,.0f} us "
        f"a message without it, {costs[True] * 1e6:,.0f} us with it"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bounce_detection")
    parser.add_argument("--bounces", type=Path, help="flufl.bounce's tests/data directory")
    parser.add_argument("--generated", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # flufl.bounce logs every detector it runs
    plain_bounce(b"From: a@b\r\n\r\nwarm-up\r\n")  # imports the detectors
    for label, corpus in (
        ("ordinary (stdlib email tests)", list(ordinary_stdlib())),
        (f"ordinary (generated, {args.generated})", list(ordinary_generated(args.generated))),
    ):
        started = time.perf_counter()
        flagged = [(name, found) for name, raw in corpus if (found := plain_bounce(raw))]
        took = time.perf_counter() - started
        size = sum(len(raw) for _, raw in corpus) / max(1, len(corpus))
        print(
            f"{label}: {len(corpus)} messages (mean {size:,.0f} bytes), "
            f"{len(flagged)} flagged as bounces "
            f"({len(flagged) / max(1, len(corpus)):.2%}), "
            f"{took / max(1, len(corpus)) * 1000:.2f} ms a message"
        )
        for name, found in flagged[:20]:
            print(f"    false positive {name}: {found}")
        pre_filter_report(label, corpus)
    if args.bounces:
        corpus = list(bounces(args.bounces))
        started = time.perf_counter()
        found = {name: plain_bounce(raw) for name, raw in corpus}
        took = time.perf_counter() - started
        missed = [name for name, flag in found.items() if not flag]
        print(
            f"flufl.bounce corpus: {len(corpus)} files, {len(corpus) - len(missed)} flagged "
            f"({(len(corpus) - len(missed)) / len(corpus):.1%}), "
            f"{took / len(corpus) * 1000:.2f} ms a message; not flagged: {', '.join(missed)}"
        )
        verdicts = {name: judged(raw) for name, raw in corpus}
        before = sorted(n for n, (b, _) in verdicts.items() if b)
        after = sorted(n for n, (_, a) in verdicts.items() if a)
        print(
            f"  challenged with the From as envelope sender: before the scan "
            f"{len(before)} ({', '.join(before)}); after {len(after)} ({', '.join(after)})"
        )
        pre_filter_report("flufl.bounce corpus", corpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
