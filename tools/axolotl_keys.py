"""Write src/tunelab/config/axolotl_keys.txt: every key of axolotl's config schema.

Reads the pydantic models of an axolotl wheel with ``ast`` (nothing of axolotl is
imported or installed):

    pip download axolotl==VERSION --no-deps -d /tmp/axo
    python tools/axolotl_keys.py /tmp/axo/axolotl-VERSION-py3-none-any.whl
"""

from __future__ import annotations

import ast
import datetime
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src/tunelab/config/axolotl_keys.txt"
TOP = "AxolotlInputConfig"
# Keys that axolotl's examples at other commits use but this version's schema does not have
# (older releases had debug and eval_table_max_new_tokens; later ones add attention).
OTHER_VERSIONS = ("attention", "debug", "eval_table_max_new_tokens")
DATASETS = (
    "SFTDataset",
    "PretrainingDataset",
    "DPODataset",
    "KTODataset",
    "StepwiseSupervisedDataset",
)


def _classes(sources: dict[str, str]) -> dict[str, tuple[list[str], list[str]]]:
    """class name -> (base names, field names and aliases)."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for text in sources.values():
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [
                b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
            ]
            names = []
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if item.target.id.startswith("_") or item.target.id == "model_config":
                        continue
                    names.append(item.target.id)
                    call = item.value
                    if isinstance(call, ast.Call):
                        for kw in call.keywords:
                            if kw.arg in ("alias", "validation_alias") and isinstance(
                                kw.value, ast.Constant
                            ):
                                names.append(kw.value.value)
            found[node.name] = (bases, names)
    return found


def _fields(name: str, classes: dict[str, tuple[list[str], list[str]]]) -> set[str]:
    bases, names = classes.get(name, ([], []))
    out = set(names)
    for base in bases:
        out |= _fields(base, classes)
    return out


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        version = next(
            n.split("/")[0].removesuffix(".dist-info").split("-")[1]
            for n in zf.namelist()
            if n.endswith(".dist-info/METADATA")
        )
        schema = {
            n: zf.read(n).decode()
            for n in zf.namelist()
            if n.startswith("axolotl/utils/schemas/") and n.endswith(".py")
        }
        plugins = {
            n: zf.read(n).decode()
            for n in zf.namelist()
            if n.startswith("axolotl/integrations/") and n.endswith("/args.py")
        }
    classes = _classes(schema)
    top = _fields(TOP, classes)
    plugin_classes = _classes(plugins)
    plugin_keys = set().union(*(_fields(c, plugin_classes) for c in plugin_classes)) - top
    dataset = set().union(*(_fields(c, classes) for c in DATASETS))
    today = datetime.date.today().isoformat()
    lines = [
        f"# Every key of axolotl's config schema, axolotl {version} (PyPI wheel),",
        f"# read from axolotl/utils/schemas/ and axolotl/integrations/*/args.py on {today}",
        "# by tools/axolotl_keys.py. Sections: [config] top-level keys, [plugin] keys that",
        "# axolotl's plugins add, [dataset] keys of a datasets entry, [other] top-level keys",
        "# of axolotl's examples at other commits that this version does not have.",
    ]
    other = set(OTHER_VERSIONS) - top - plugin_keys
    sections = (("config", top), ("plugin", plugin_keys), ("dataset", dataset), ("other", other))
    for title, keys in sections:
        lines += ["", f"[{title}]", *sorted(keys)]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"{OUT}: {len(top)} config, {len(plugin_keys)} plugin, {len(dataset)} dataset keys")


if __name__ == "__main__":
    main(sys.argv[1])
