"""Real texts of different kinds for document tests: licenses, code, prose in other languages, a large file.

Character-per-token ratios differ by kind (SmolLM2: ~4.6 for English license text, ~3 for code, less for
French and far less for Japanese), which is what an estimate of four characters per token gets wrong.
The licenses come from the host's /usr/share/common-licenses (Debian's base-files) and the code from the
Python standard library, copied at test time; the prose is ours.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.conftest import need

LICENSES = Path("/usr/share/common-licenses")
LARGE_PARTS = ("GPL-3", "LGPL-2.1", "GFDL-1.3", "MPL-1.1", "GPL-2")

FRENCH = """# Compte rendu de la réunion du comité

Le comité s'est réuni mardi soir pour examiner le budget de l'année prochaine. Les dépenses de
fonctionnement ont augmenté de huit pour cent, surtout à cause du chauffage et des salaires.

Il a été décidé de reporter la rénovation de la bibliothèque à l'automne. La trésorière présentera un
nouveau plan de financement lors de la prochaine séance, prévue le douze mars.
"""

JAPANESE = """会議の記録

委員会は火曜日の夜に集まり、来年度の予算を検討した。運営費は主に暖房費と人件費のために八パーセント増えた。
図書館の改修は秋まで延期することになった。会計係は三月十二日の次回の会合で新しい資金計画を発表する。
"""


def _license(name: str) -> str:
    path = LICENSES / name
    need(path.is_file(), f"{path} (Debian base-files)")
    return path.read_text(encoding="utf-8")


def small_texts(folder: Path) -> Path:
    """Four short real documents of four kinds (about 1,300 SmolLM2 tokens in all)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "licenses").mkdir(exist_ok=True)
    (folder / "licenses" / "bsd.txt").write_text(_license("BSD"), encoding="utf-8")
    apache = _license("Apache-2.0")
    (folder / "licenses" / "apache-2.0-head.txt").write_text(apache[: apache.index("\n\n", 2000)],
                                                               encoding="utf-8")
    code = Path(textwrap.__file__).read_text(encoding="utf-8")
    (folder / "textwrap.py.txt").write_text("\n".join(code.splitlines()[:32]), encoding="utf-8")
    (folder / "compte-rendu.md").write_text(FRENCH, encoding="utf-8")
    (folder / "kaigi.txt").write_text(JAPANESE, encoding="utf-8")
    return folder


def large_text(folder: Path) -> Path:
    """One file of over 100 KB: several licenses one after the other."""
    path = folder / "licenses-large.txt"
    path.write_text("\n\n".join(_license(name) for name in LARGE_PARTS), encoding="utf-8")
    assert path.stat().st_size > 100_000
    return path
