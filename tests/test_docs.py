"""The docs a newcomer follows: every command they show exists, and the README stays short.

Commands are read from the shell code blocks of README.md and docs/**/*.md, and from inline code
that starts with ``graft``, ``make``, ``dvc`` or ``python``. Each is checked against what it names:
``graft`` sub-commands and options against the Typer app, ``make`` targets against the Makefile,
``python FILE`` against the checkout, ``dvc`` commands against DVC's own argument parser, and
``-S key=value`` against ``params.yaml``'s models, ``prefect`` deployments and pools against
``prefect.yaml``, and ``pip install`` never names the unrelated PyPI package ``graft``. Params keys
and source paths written in inline code must exist; README figures must be bench/results values.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer.main
import yaml

from graft.cli import app
from graft.cli_reference import cli_reference_markdown
from graft.config import Params, ParamsError, parse_params
from graft.params_reference import key_docs, params_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", ""}
CHECKED_PROGRAMS = ("graft", "make", "dvc", "python", "python3", "pip", "prefect")
# Paths a reader is told to open or run: sources, not pipeline outputs (models/, reports/, ...).
SOURCE_PATH = re.compile(
    r"^(?:src|flows|bench|tests|transfer|docs|\.ci)/[\w./-]*\w$"
    r"|^(?:dvc\.yaml|params\.yaml|prefect\.yaml|mkdocs\.yml|Dockerfile|Makefile|data\.dvc"
    r"|pyproject\.toml)$"
)
FILE_SUFFIXES = (".py", ".json", ".md", ".yaml", ".yml", ".csv", ".png", ".onnx", ".pt", ".dvc")


@dataclass(frozen=True)
class Command:
    """One command as written in a page: where, and its words.

    ``inline`` commands are named in prose (`dvc artifacts get`) and may leave out arguments.
    """

    where: str
    argv: tuple[str, ...]
    inline: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _split_commands(line: str) -> list[list[str]]:
    """A shell line's simple commands: split on ``&&``, ``||``, ``;`` and ``|``, comments off."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a command a reader can run as written
        return [line.split()]
    for token in tokens:
        if token and set(token) <= set(";&|"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [words for words in [*commands, words] if words]


def commands_in(text: str, where: str) -> list[Command]:
    """The checked commands of one Markdown page."""
    found = []
    in_block, language, lines = False, "", []
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and not in_block:
            in_block, language, lines = True, fence.group(1), []
            continue
        if fence and in_block:
            in_block = False
            if language in SHELL_LANGUAGES:
                joined = "\n".join(lines).replace("\\\n", " ")
                for shell_line in joined.splitlines():
                    for words in _split_commands(shell_line):
                        found.append(Command(where, tuple(words)))
            continue
        if in_block:
            lines.append(line)
            continue
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", line):
            words = span.split()
            # `graft promote: ... not found` quotes a message, not a command
            if words[0] in CHECKED_PROGRAMS and len(words) > 1 and not re.search(r":(\s|$)", span):
                for words in _split_commands(span):
                    found.append(Command(where, tuple(words), inline=True))
    return [c for c in found if c.argv[0].split("/")[-1] in CHECKED_PROGRAMS]


def inline_spans(text: str) -> list[str]:
    """Inline code outside fenced blocks."""
    outside = re.sub(r"(?ms)^\s*```.*?^\s*```", "", text)
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", outside)


# --- what each program accepts ------------------------------------------------------------------


def _graft_problem(args: list[str]) -> str | None:
    group = typer.main.get_command(app)
    context = click.Context(group, info_name="graft")
    options = {opt for param in group.params for opt in param.opts + param.secondary_opts}
    while args and args[0].startswith("-"):
        if args[0] not in options | {"--help"}:
            return f"graft has no option {args[0]}"
        args = args[1:]
    if not args:
        return None
    name, rest = args[0], args[1:]
    command = group.get_command(context, name)
    if command is None:
        return f"graft has no sub-command {name!r}"
    options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    for word in rest:
        if word.startswith("-") and word != "-":
            option = word.split("=", 1)[0]
            if option not in options | {"--help"}:
                return f"graft {name} has no option {option}"
    return None


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"(?m)^([A-Za-z0-9_.-]+)\s*:(?!=)", text))


def _make_problem(args: list[str]) -> str | None:
    targets = makefile_targets()
    for word in args:
        if "=" in word or word.startswith("-"):
            continue  # a variable (TEST_WORKERS=0) or a make option
        if word not in targets:
            return f"the Makefile has no target {word!r}"
    return None


def _python_problem(args: list[str]) -> str | None:
    if not args or args[0] in ("-c",):
        return None
    if args[0] == "-m":
        module = args[1]
        if importlib.util.find_spec(module) is None:
            return f"no module {module} to run with python -m"
        return None
    if not (ROOT / args[0]).is_file():
        return f"{args[0]} does not exist"
    return None


def _set_params_problem(assignments: list[str]) -> str | None:
    """``dvc exp run -S key=value``: the key must be a params.yaml key, the value valid for it."""
    raw: dict = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    try:
        parse_params(raw)
    except ParamsError as exc:
        return f"-S {' '.join(assignments)}: {exc}"
    return None


def _dvc_problem(args: list[str], inline: bool = False) -> str | None:
    """A command DVC's parser takes; in prose, a command DVC has (arguments may be left out)."""
    from dvc.cli import DvcParserError, parse_args

    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            parsed = parse_args([*args, "--help"] if inline else args)
    except SystemExit as stop:  # --help exits 0 once it has found the command
        parsed = None
        if not inline or stop.code not in (0, None):
            return "dvc cannot parse it: " + output.getvalue().strip().rsplit("\n", 1)[-1]
    except DvcParserError:
        return "dvc cannot parse it: " + output.getvalue().strip().rsplit("\n", 1)[-1]
    assignments = [
        value
        for option, value in zip(args, args[1:], strict=False)
        if option in ("-S", "--set-param")
    ]
    if parsed is not None:
        assignments = getattr(parsed, "set_param", None) or []
    return _set_params_problem(assignments) if assignments else None


def _pip_problem(args: list[str]) -> str | None:
    if args[:1] != ["install"]:
        return None
    for word in args[1:]:
        if re.match(r"^graft(\[[\w,]+\])?([<>=!~].*)?$", word):
            return (
                f"`pip install {word}` installs an unrelated PyPI package: install from the clone"
            )
    return None


def _prefect_problem(args: list[str]) -> str | None:
    """``prefect deployment run FLOW/NAME`` and ``--pool P`` name what prefect.yaml declares."""
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    names, pools = set(), set()
    for deployment in declared:
        path, function = deployment["entrypoint"].split(":")
        source = (ROOT / path).read_text()
        flow = re.search(rf'@flow\(name="([^"]+)"[^\n]*\)\ndef {function}\(', source)
        names.add(f"{flow.group(1)}/{deployment['name']}")
        pools.add(deployment["work_pool"]["name"])
    if args[:2] == ["deployment", "run"] and args[2] not in names:
        return f"prefect.yaml deploys {sorted(names)}, not {args[2]}"
    if "--pool" in args and args[args.index("--pool") + 1] not in pools:
        return (
            f"prefect.yaml's work pools are {sorted(pools)}, not {args[args.index('--pool') + 1]}"
        )
    return None


def command_problem(command: Command) -> str | None:
    """What is wrong with a command as documented, or None when everything it names exists."""
    program, args = command.argv[0].split("/")[-1], list(command.argv[1:])
    if program == "graft":
        return _graft_problem(args)
    if program == "make":
        return _make_problem(args)
    if program in ("python", "python3"):
        return _python_problem(args)
    if program == "dvc":
        return _dvc_problem(args, command.inline)
    if program == "pip":
        return _pip_problem(args)
    if program == "prefect":
        return _prefect_problem(args)
    return None


def all_commands() -> list[Command]:
    commands = []
    for page in doc_pages():
        commands += commands_in(page.read_text(), str(page.relative_to(ROOT)))
    return commands


# --- the tests ----------------------------------------------------------------------------------


def test_the_parser_finds_the_documented_commands_of_every_kind():
    commands = all_commands()
    programs = {command.argv[0] for command in commands}
    assert len(commands) >= 80, len(commands)
    assert {"graft", "make", "dvc", "python", "pip", "prefect"} <= programs
    assert any(command.argv[:2] == ("make", "run") for command in commands)
    assert any(command.argv[:3] == ("dvc", "exp", "run") for command in commands)
    assert any(command.argv[:2] == ("graft", "serve") for command in commands)


def test_every_documented_command_exists():
    problems = [
        f"{command}  ->  {problem}"
        for command in all_commands()
        if (problem := command_problem(command))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("graft trian-head", "no sub-command 'trian-head'"),
        ("graft serve models/model.onnx --prot 8000", "graft serve has no option --prot"),
        ("graft --verison", "graft has no option --verison"),
        ("make docs && make tset", "no target 'tset'"),
        ("python flows/no_such_flow.py", "flows/no_such_flow.py does not exist"),
        ("python -m graft.no_such_module", "no module graft.no_such_module"),
        ("dvc reproduce", "dvc cannot parse it"),
        ("dvc exp run -S head.lrate=0.1", "unknown key 'head.lrate'"),
        ("dvc exp run -S head.kind=cnn", "key 'head.kind'"),
        ('pip install "graft[serve]"', "unrelated PyPI package"),
        ("prefect deployment run graft-training/weekly", "not graft-training/weekly"),
        ("prefect worker start --pool default", "work pools are"),
    ],
)
def test_a_command_that_does_not_exist_is_reported(line: str, complaint: str):
    page = f"Intro.\n\n```bash\nmake run   # fine\n{line}   # the broken one\n```\n"
    commands = commands_in(page, "fake.md")
    problems = [command_problem(command) for command in commands]
    assert problems[0] is None  # make run
    assert complaint in (problems[-1] or ""), problems


def test_a_dvc_command_named_in_prose_may_leave_out_its_arguments():
    page = "Run `dvc artifacts get` again, or `dvc exp run -S head.lrate=1`, never `dvc fetchall`."
    problems = [command_problem(command) for command in commands_in(page, "fake.md")]
    assert problems[0] is None
    assert "unknown key 'head.lrate'" in problems[1]
    assert "dvc cannot parse it" in problems[2]
    block = "```bash\ndvc artifacts get\n```\n"  # in a code block it must run as written
    assert "dvc cannot parse it" in command_problem(commands_in(block, "fake.md")[0])


def test_inline_commands_and_continuation_lines_are_read():
    page = (
        "Run `graft kshot --root here` or `make help`.\n\n"
        "```bash\ngraft predict model.onnx photos/ \\\n    -o out.csv\n```\n"
        "```python\nimport graft  # not a shell block\n```\n"
    )
    argvs = [command.argv for command in commands_in(page, "fake.md")]
    assert argvs == [
        ("graft", "kshot", "--root", "here"),
        ("make", "help"),
        ("graft", "predict", "model.onnx", "photos/", "-o", "out.csv"),
    ]


def test_every_params_key_named_in_the_docs_exists():
    keys = {doc.key.replace("[]", "") for doc in key_docs()}
    sections = set(Params.model_fields)
    pattern = re.compile(rf"^(?:{'|'.join(sections)})\.[a-z_0-9.]+(?:\.\*)?$")
    problems = []
    for page in doc_pages():
        for span in inline_spans(page.read_text()):
            for word in re.split(r"[\s:=`,]+", span):
                if not pattern.match(word) or word.endswith(FILE_SUFFIXES):
                    continue
                key = word.removesuffix(".*")
                if key not in keys and not any(k.startswith(key + ".") for k in keys):
                    problems.append(f"{page.relative_to(ROOT)}: `{span}` names no key {key}")
    assert not problems, "\n".join(problems)


def test_every_source_path_named_in_the_docs_exists():
    problems = []
    for page in doc_pages():
        for span in inline_spans(page.read_text()):
            for word in span.split():
                if SOURCE_PATH.match(word) and not (ROOT / word).exists():
                    problems.append(f"{page.relative_to(ROOT)}: {word} does not exist")
    assert not problems, "\n".join(problems)


def resolves(dotted: str) -> bool:
    """``graft.x.y`` names an importable module, or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def test_every_graft_module_named_in_the_docs_exists():
    problems = []
    for page in doc_pages():
        for span in inline_spans(page.read_text()):
            dotted = re.match(r"^(graft(?:\.\w+)+)", span)
            if dotted and not resolves(dotted.group(1)):
                problems.append(f"{page.relative_to(ROOT)}: {dotted.group(1)} does not exist")
    assert not problems, "\n".join(problems)
    assert not resolves("graft.no_such_module") and not resolves("graft.errors.NoSuchError")


def test_readme_is_short_and_its_links_lead_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)]*))?\)", readme)
    assert len(links) >= 10
    missing = [link for link, _ in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing
    anchors = [(link, anchor) for link, anchor in links if anchor and link.endswith(".md")]
    assert anchors
    for link, anchor in anchors:  # the heading's id as MkDocs' toc makes it
        headings = re.findall(r"(?m)^#+ (.+)$", (ROOT / link).read_text())
        slugs = {
            re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings
        }
        assert anchor in slugs, (link, anchor, sorted(slugs))


def test_readme_keeps_the_two_commands_and_installs_from_the_clone():
    readme = (ROOT / "README.md").read_text()
    argvs = [command.argv for command in commands_in(readme, "README.md")]
    assert ("make", "run") in argvs and ("make", "test") in argvs
    assert ("pip", "install", ".[train]") in argvs


def test_params_reference_lists_every_key_of_params_yaml_with_its_default():
    reference = params_reference_markdown()
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict) and key != "stage_timeouts_s":
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    missing = [key for key in leaves(shipped) if f"| `{key}` |" not in reference]
    assert not missing
    # a nested section's own defaults, not its class's: transfer trains at a lower LR
    assert "| `transfer.training.lr` | float | `0.001` |" in reference
    assert "| `pretrain.training.lr` | float | `0.005` |" in reference
    assert "| `select.candidates[].name` | str | `required` |" in reference
    assert "| `finetune.bn` | one of `frozen`, `adapt`, `auto` | `frozen` |" in reference


def test_every_params_key_has_a_meaning_in_the_reference():
    """A key added to graft.config without a description would be a blank row for the reader."""
    blank = [doc.key for doc in key_docs() if not doc.meaning]
    assert not blank, f"give these keys a Field(description=...) in graft.config: {blank}"


def _numbers(node) -> list[float]:
    if isinstance(node, bool):
        return []
    if isinstance(node, int | float):
        return [float(node)]
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [number for item in node for number in _numbers(item)]
    return []


DOC_NUMBER = re.compile(r"(?<![A-Za-z0-9.,])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?=x\b|\s|$|[),;/])")


def figure_problems(readme: str) -> tuple[int, list[str]]:
    """README figure rows ``| figure | value | `python bench/X.py` |``: each number in the value
    is a value of bench/results/X.json at the precision shown."""
    rows, problems = 0, []
    for line in readme.splitlines():
        match = re.match(r"^\|(.+)\|(.+)\|.*`python (bench/\w+)\.py`", line)
        if not match:
            continue
        rows += 1
        results = ROOT / "bench" / "results" / (Path(match.group(3)).name + ".json")
        if not results.is_file():
            problems.append(f"{results.relative_to(ROOT)} does not exist: {line}")
            continue
        measured = _numbers(json.loads(results.read_text()))
        for whole, fraction in DOC_NUMBER.findall(match.group(2)):
            shown = float(whole.replace(",", "") + fraction)
            places = len(fraction) - 1 if fraction else 0
            if not any(round(value, places) == shown for value in measured):
                problems.append(f"{whole}{fraction} is not in {results.name}: {line}")
    return rows, problems


def test_readme_figures_are_the_ones_in_bench_results():
    rows, problems = figure_problems((ROOT / "README.md").read_text())
    assert rows >= 6
    assert not problems, "\n".join(problems)


def test_a_figure_not_in_bench_results_is_reported():
    row = "| head training | linear 7.5 s, MLP 99 s | `python bench/train.py` |"
    assert figure_problems(row) == (1, [f"99 is not in train.json: {row}"])


def test_cli_reference_shows_every_sub_command_with_its_options():
    reference = cli_reference_markdown(app)
    group = typer.main.get_command(app)
    context = click.Context(group, info_name="graft")
    assert "--version" in reference.split("## `graft ")[0]
    for name in group.list_commands(context):
        section = reference.split(f"## `graft {name}`\n", 1)[1].split("\n## ", 1)[0]
        command = group.get_command(context, name)
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.opts[-1] in section, (name, param.opts)
    assert "graft serve" in reference and "--reload-interval" in reference
