"""Render the API reference (docs/api.md) from the .proto and its comments.

python proto/api_doc.py > docs/api.md      # regenerate
python proto/api_doc.py --check            # fail if docs/api.md is stale (run by the tests)
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "treadle" / "v1" / "treadle.proto"
DOC = HERE.parent / "docs" / "api.md"

_BLOCK = re.compile(r"^(service|message|enum)\s+(\w+)\s*\{")
_RPC = re.compile(r"^rpc\s+(\w+)\((stream\s+)?(\w+)\)\s+returns\s+\((stream\s+)?(\w+)\)")
_FIELD = re.compile(r"^(optional\s+|repeated\s+)?([\w.<>, ]+?)\s+(\w+)\s*=\s*(\d+);")
_VALUE = re.compile(r"^(\w+)\s*=\s*(\d+);")
_ONEOF = re.compile(r"^oneof\s+(\w+)\s*\{")


@dataclass
class Block:
    kind: str  # service, message, enum
    name: str
    doc: str
    rows: list[tuple[str, ...]] = field(default_factory=list)


def parse(text: str) -> tuple[str, list[Block]]:
    """The file's leading comment and its services, messages and enums, in order."""
    header: list[str] = []
    blocks: list[Block] = []
    stack: list[Block] = []
    comment: list[str] = []
    oneof = ""
    seen_code = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        if not line:
            if not seen_code and comment:
                header, comment = comment, []
            continue
        seen_code = True
        doc, comment = " ".join(comment), []
        if m := _BLOCK.match(line):
            name = f"{stack[-1].name}.{m.group(2)}" if stack else m.group(2)  # Outer.Inner
            block = Block(m.group(1), name, doc)
            blocks.append(block)
            if not line.endswith("}"):  # `message Empty {}` opens and closes on one line
                stack.append(block)
        elif m := _ONEOF.match(line):
            oneof = m.group(1)
        elif line == "}":
            if oneof:
                oneof = ""
            elif stack:
                stack.pop()
        elif stack and (m := _RPC.match(line)):
            request = ("stream " if m.group(2) else "") + m.group(3)
            response = ("stream " if m.group(4) else "") + m.group(5)
            stack[-1].rows.append((m.group(1), request, response, doc))
        elif stack and stack[-1].kind == "enum" and (m := _VALUE.match(line)):
            stack[-1].rows.append((m.group(1), m.group(2), doc))
        elif stack and (m := _FIELD.match(line)):
            label = (m.group(1) or "").strip()
            kind = f"{label} {m.group(2)}".strip()
            note = f"(one of `{oneof}`) {doc}" if oneof else doc
            stack[-1].rows.append((m.group(3), kind, m.group(4), note))
    return "\n".join(header), blocks


def render(text: str) -> str:
    header, blocks = parse(text)
    out = [
        "# API reference: treadle.v1",
        "",
        "Generated from `proto/treadle/v1/treadle.proto` by `python proto/api_doc.py`;",
        "the tests fail when this page and the .proto disagree. The .proto ships in the",
        "installed package beside the Python stubs, so a program in another language can",
        "generate its client from an installed treadle:",
        '`python -c "import treadle.v1, pathlib; print(pathlib.Path(treadle.v1.__file__).parent'
        " / 'treadle.proto')\"`.",
        "",
        header,
        "",
    ]
    for block in blocks:
        out += [f"## {block.kind} `{block.name}`", "", block.doc, ""]
        if block.kind == "service":
            out += ["| rpc | request | response | what it does |", "| --- | --- | --- | --- |"]
            out += [f"| `{n}` | `{req}` | `{resp}` | {d} |" for n, req, resp, d in block.rows]
        elif block.kind == "enum":
            out += ["| value | number | meaning |", "| --- | --- | --- |"]
            out += [f"| `{n}` | {num} | {d} |" for n, num, d in block.rows]
        elif block.rows:
            out += ["| field | type | number | meaning |", "| --- | --- | --- | --- |"]
            out += [
                f"| `{n}` | `{t.replace('|', '/')}` | {num} | {d} |" for n, t, num, d in block.rows
            ]
        else:
            out.append("No fields.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    page = render(PROTO.read_text())
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text() != page:
            print("docs/api.md is stale: python proto/api_doc.py > docs/api.md", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
