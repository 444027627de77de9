"""Build the code <-> text task from the Python standard library's own functions and docstrings.

    .venv/bin/python examples/data/code/make_code_text.py [--train 160] [--test 100]

Every public function or method of the standard library's top-level pure-Python modules that has a
docstring and a short body (2-8 lines, at most 300 characters) gives two rows:
- docstring: the function without its docstring -> the docstring's first sentence;
- code: "Write the Python function NAME(ARGS): <first sentence>" -> the function without its docstring.
Modules, not functions, are split between train and test (a stable hash of the module name), so
every test function comes from a module the model never saw in training. Writes train.jsonl
(docstring and code rows interleaved), docstring_test.jsonl and code_test.jsonl (prompt/answer
fields for `tunelab eval`).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"this", "antigravity", "__phello__", "__future__", "__hello__"}
TEST_SHARE = 0.2
DOCSTRING_PROMPT = "Write a one-sentence docstring for this Python function.\n\n{code}"
CODE_PROMPT = "Write the Python function {name}({args}): {summary}"


def is_test_module(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 1000 < TEST_SHARE * 1000


def first_sentence(doc: str) -> str | None:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", paragraph)[0].strip()
    words = sentence.split()
    if not 4 <= len(words) <= 30 or "XXX" in sentence or ">>>" in sentence:
        return None
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def functions(module: str, source: str):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        summary = first_sentence(doc) if doc else None
        if summary is None:
            continue
        body = node.body[1:]  # without the docstring
        if not body:
            continue
        stripped = ast.FunctionDef(name=node.name, args=node.args, body=body, decorator_list=[], returns=node.returns,
                                   type_comment=None, type_params=[])
        code = ast.unparse(ast.fix_missing_locations(stripped))
        lines = code.count("\n")
        if not 2 <= lines <= 8 or len(code) > 300:
            continue
        args = ast.unparse(node.args)
        yield {"module": module, "name": node.name, "args": args, "summary": summary, "code": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=160, help="functions in the training file (2 rows each)")
    parser.add_argument("--test", type=int, default=100, help="functions per test file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = {"train": [], "test": []}
    seen = set()
    for path in sorted(stdlib.glob("*.py")):
        module = path.stem
        if module in SKIP or module.startswith("_"):
            continue
        for item in functions(module, path.read_text(encoding="utf-8", errors="replace")):
            if item["code"] in seen:
                continue
            seen.add(item["code"])
            found["test" if is_test_module(module) else "train"].append(item)
    rng = random.Random(args.seed)
    for split in found.values():
        rng.shuffle(split)
    train = found["train"][: args.train]
    test = found["test"][: args.test]
    with (HERE / "train.jsonl").open("w") as out:
        for item in train:
            for prompt, answer in ((DOCSTRING_PROMPT.format(code=item["code"]), item["summary"]),
                                   (CODE_PROMPT.format(**item), item["code"])):
                out.write(json.dumps({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                      "module": item["module"]}) + "\n")
    for name, prompt, answer in (("docstring_test", DOCSTRING_PROMPT, "summary"), ("code_test", CODE_PROMPT, "code")):
        with (HERE / f"{name}.jsonl").open("w") as out:
            for item in test:
                out.write(json.dumps({"prompt": prompt.format(**item), "answer": item[answer], "module": item["module"]}) + "\n")
    modules = {split: sorted({i["module"] for i in items}) for split, items in (("train", train), ("test", test))}
    print(f"{len(found['train'])} train / {len(found['test'])} test functions found; wrote {len(train)} train, {len(test)} test "
          f"from {len(modules['train'])} / {len(modules['test'])} modules (test modules: {', '.join(modules['test'])})")


if __name__ == "__main__":
    main()
