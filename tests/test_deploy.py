"""The deployment files: docker-compose.yml, deploy/Dockerfile.{cpu,cuda}, deploy/k8s/*.yaml.

No Docker engine and no cluster run here, so these tests read the files: YAML structure, Dockerfile
instructions, cross-references (selectors, secrets, config keys, the KEDA target and queue), secret
hygiene, and above all that every command the files give to `tokenmill` is one the CLI really has, with
options it really takes, parsed by click exactly as the container would parse them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import click
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
K8S_DIR = DEPLOY / "k8s"
DOCKERFILE_CPU = DEPLOY / "Dockerfile.cpu"
DOCKERFILE_CUDA = DEPLOY / "Dockerfile.cuda"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_README = DEPLOY / "README.md"
CELERY_APP = "tokenmill.celery_app:app"
# The one placeholder a secret may hold in these files (documented in deploy/README.md).
PLACEHOLDER = "change-me"
NAMESPACE = "tokenmill"

Doc = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Resolving a command line against a click command tree (the typer app, once converted).
# --------------------------------------------------------------------------------------------------


class CliMismatch(AssertionError):
    """A command line that the CLI would reject."""


# typer >= 0.20 vendors its own click (typer._click), whose classes are not click's: everything below
# is duck-typed on the click API both share (get_params, opts, make_context, get_command, ...).
_USAGE_ERRORS: tuple[type[Exception], ...] = (click.ClickException, typer.TyperException)


def _is_group(cmd: Any) -> bool:
    return callable(getattr(cmd, "get_command", None)) and callable(getattr(cmd, "list_commands", None))


def _options_by_name(cmd: Any, ctx: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for param in cmd.get_params(ctx):
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                opts[name] = param
    return opts


def _check_options(cmd: Any, ctx: Any, args: list[str], where: str, *, group: bool) -> list[str]:
    """Check every ``-x``/``--xx`` token names an option of ``cmd``; return the remaining tokens.

    For a group, stop at the first positional token (the subcommand) and return it and what follows;
    for a leaf command, return the positional tokens (options and their values removed).
    """
    opts = _options_by_name(cmd, ctx)
    rest: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return args[i:] if group else rest + args[i + 1 :]
        if token.startswith("-") and token != "-":
            name, eq, _ = token.partition("=")
            param = opts.get(name)
            if param is None:
                raise CliMismatch(f"`{where}` has no option {name}; it has: {', '.join(sorted(opts))}")
            if not (param.is_flag or param.count) and not eq:
                if i + param.nargs >= len(args):
                    raise CliMismatch(f"`{where}`: option {name} needs a value")
                i += param.nargs  # skip its value(s)
            i += 1
            continue
        if group:
            return args[i:]
        rest.append(token)
        i += 1
    return rest


def resolve_cli(root: Any, argv: Sequence[str], prog: str = "tokenmill") -> list[str]:
    """Resolve ``argv`` (no program name) to the command path it runs; raise CliMismatch if it would not.

    ``root`` is a click command tree (``typer.main.get_command(app)``). Walks groups by subcommand name,
    checks every option token against the command's declared options, then lets click parse the leaf's
    arguments for real (types, ranges, required options, extra arguments) without invoking it.
    """
    args = list(argv)
    cmd = root
    path = [prog]
    while _is_group(cmd):
        ctx = cmd.context_class(cmd, info_name=path[-1])
        args = _check_options(cmd, ctx, args, " ".join(path), group=True)
        if not args:
            names = ", ".join(cmd.list_commands(ctx))
            raise CliMismatch(f"`{' '.join(path)}` needs a subcommand; it has: {names}")
        name = args.pop(0)
        sub = cmd.get_command(ctx, name)
        if sub is None:
            names = ", ".join(cmd.list_commands(ctx))
            raise CliMismatch(f"`{' '.join(path)}` has no command {name!r}; it has: {names}")
        cmd = sub
        path.append(name)
    where = " ".join(path)
    _check_options(cmd, cmd.context_class(cmd, info_name=path[-1]), args, where, group=False)
    try:
        with cmd.make_context(where, list(args)):
            pass
    except _USAGE_ERRORS as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise CliMismatch(f"`{where} {shlex.join(args)}`: {message}") from exc
    return path


# --------------------------------------------------------------------------------------------------
# Docker Compose variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$).
# --------------------------------------------------------------------------------------------------

_COMPOSE_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m["name"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?") and not (current if op == ":?" else current is not None):
            raise ValueError(f"${{{name}}} is required: {arg}")
        return current or ""

    return _COMPOSE_VAR.sub(sub, value)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


# --------------------------------------------------------------------------------------------------
# Dockerfiles.
# --------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction | None:
        found = [ins for ins in self.instructions if ins.keyword == keyword]
        return found[-1] if found else None

    def variables(self) -> dict[str, str]:
        """ARG defaults and ENV values of this stage, in order, ``${VAR}`` substituted."""
        values: dict[str, str] = {}
        for ins in self.instructions:
            if ins.keyword in ("ARG", "ENV"):
                for key, value in assignments(ins.args).items():
                    values[key] = substitute(value, values)
        return values


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions: continuation lines joined, comments and blank lines dropped."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continued instruction, as Docker does
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    if buffer:
        logical.append((start, buffer.rstrip()))
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def assignments(args: str) -> dict[str, str]:
    """``KEY=value KEY2="v w"`` (or the legacy ``KEY value``) of an ARG/ENV instruction."""
    words = shlex.split(args)
    if words and all("=" in w for w in words):
        return dict(w.split("=", 1) for w in words)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}  # ENV KEY value / ARG KEY (no default)
    return {}


def substitute(value: str, variables: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), value)


def exec_form(instruction: Instruction | None) -> list[str] | None:
    """The JSON (exec) form of ENTRYPOINT/CMD, or None for the shell form."""
    if instruction is None:
        return None
    try:
        value = json.loads(instruction.args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def load_dockerfile(path: Path) -> list[Stage]:
    return parse_dockerfile(path.read_text())


def image_default(path: Path) -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD (exec form) of a Dockerfile's final stage."""
    final = load_dockerfile(path)[-1]
    return exec_form(final.last("ENTRYPOINT")) or [], exec_form(final.last("CMD")) or []


def cmake_args(stage: Stage) -> list[str]:
    """Every CMAKE_ARGS value the stage sets: ARG/ENV, or inline before a RUN command."""
    variables = stage.variables()
    found = [variables["CMAKE_ARGS"]] if "CMAKE_ARGS" in variables else []
    for ins in stage.instructions:
        if ins.keyword == "RUN":
            for m in re.finditer(r"CMAKE_ARGS=(\"[^\"]*\"|'[^']*'|\S+)", ins.args):
                found.append(substitute(m[1].strip("\"'"), variables))
    return found


BUILD_SCRIPT = DEPLOY / "gpu" / "build_llama.sh"
GPU_RUN = DEPLOY / "gpu" / "run.sh"


@dataclass(frozen=True)
class BuildCall:
    """One call of deploy/gpu/build_llama.sh: ``build_llama.sh SRC BUILD BACKEND ARCHS [JOBS]``."""

    src: str
    build: str
    backend: str
    archs: str

    def flags(self) -> list[str]:
        """The cmake flags the script passes for this call (its PRINT_FLAGS=1 mode: nothing is built)."""
        out = subprocess.run(
            ["bash", str(BUILD_SCRIPT), self.src, self.build, self.backend, self.archs, "1"],
            env={"PATH": "/usr/bin:/bin", "PRINT_FLAGS": "1"}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.split()


def _build_calls(text: str, variables: Mapping[str, str]) -> list[BuildCall]:
    calls = []
    for m in re.finditer(r"build_llama\.sh\"?\s+((?:[^\s\\]+\s*(?:\\\n)?\s*){4})", text):
        args = shlex.split(m[1].replace("\\\n", " "))[:4]
        calls.append(BuildCall(*(substitute(a, variables) for a in args)))
    return calls


def build_script_calls(stage: Stage) -> list[BuildCall]:
    """Every build_llama.sh call of a Dockerfile stage's RUN instructions, ARGs substituted."""
    variables = stage.variables()
    return [c for ins in stage.instructions if ins.keyword == "RUN" for c in _build_calls(ins.args, variables)]


def run_script_calls() -> list[BuildCall]:
    """build_llama.sh as deploy/gpu/run.sh calls it, with the script's defaults (an H100's architecture)."""
    text = GPU_RUN.read_text()
    default = re.search(r"^backend=\$\{GPU_RUN_BACKEND:-(\w+)\}", text, re.MULTILINE)
    assert default, "run.sh no longer sets its backend from GPU_RUN_BACKEND"
    return _build_calls(text, {"backend": default[1], "arch": "90", "jobs": "16"})


# --------------------------------------------------------------------------------------------------
# Loading the files.
# --------------------------------------------------------------------------------------------------


def load_compose(env: Mapping[str, str] | None = None) -> Doc:
    """docker-compose.yml as `docker compose config` would see it with ``env`` (default: nothing set)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(raw, dict), "docker-compose.yml is not a mapping"
    return interpolate_tree(raw, env or {})


def k8s_files() -> list[Path]:
    return sorted([*K8S_DIR.glob("*.yaml"), *K8S_DIR.glob("*.yml")])


def load_k8s() -> list[tuple[Path, Doc]]:
    objects: list[tuple[Path, Doc]] = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append((path, doc))
    return objects


def k8s_objects(kind: str) -> list[Doc]:
    return [doc for _, doc in load_k8s() if doc.get("kind") == kind]


def k8s_object(kind: str, name: str) -> Doc:
    matches = [doc for doc in k8s_objects(kind) if doc["metadata"]["name"] == name]
    assert matches, f"no {kind} named {name!r} in deploy/k8s"
    return matches[0]


def deployment_named(suffix: str) -> Doc:
    matches = [d for d in k8s_objects("Deployment") if d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, (
        f"expected one Deployment named *{suffix}, found {[m['metadata']['name'] for m in matches]}"
    )
    return matches[0]


def pod_spec(deployment: Doc) -> Doc:
    return deployment["spec"]["template"]["spec"]


def containers(deployment: Doc) -> list[Doc]:
    spec = pod_spec(deployment)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def data_of(kind: str, name: str) -> dict[str, str]:
    obj = k8s_object(kind, name)
    return dict(obj.get("stringData", {}) if kind == "Secret" else obj.get("data", {}))


_K8S_REF = re.compile(r"\$\$|\$\((\w+)\)")


def container_env(container: Doc) -> tuple[dict[str, str], list[str]]:
    """The container's environment as the kubelet builds it, and any $(VAR) it could not expand."""
    env: dict[str, str] = {}
    unresolved: list[str] = []
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data_of("ConfigMap", source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(data_of("Secret", source["secretRef"]["name"]))

    def expand(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        if m[1] not in env:
            unresolved.append(m[1])
            return m[0]
        return env[m[1]]

    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = _K8S_REF.sub(expand, item["value"])
            continue
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env[name] = data_of("Secret", ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[name] = data_of("ConfigMap", ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
        else:
            env[name] = "<from the pod>"
    return env, unresolved


def option_value(argv: Sequence[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def cpu_quantity(value: object) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------------------------------
# Every command line the files hand to a container of a tokenmill image.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    where: str
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name if self.argv else ""


def _as_argv(value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), f"expected a list or a string, got {value!r}"
    return [str(v) for v in value]


def _image_dockerfile(image: str) -> Path | None:
    if "tokenmill" not in image:
        return None
    return DOCKERFILE_CUDA if "cuda" in image else DOCKERFILE_CPU


def dockerfile_invocations() -> Iterator[Invocation]:
    for path in (DOCKERFILE_CPU, DOCKERFILE_CUDA):
        entrypoint, cmd = image_default(path)
        yield Invocation(f"{path.relative_to(ROOT)}: ENTRYPOINT + CMD", (*entrypoint, *cmd))


def compose_invocations() -> Iterator[Invocation]:
    for name, service in load_compose()["services"].items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile: Path | None = context / (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
        else:
            dockerfile = _image_dockerfile(str(service.get("image", "")))
        if dockerfile is None:
            continue  # a third-party image (redis, postgres)
        image_entrypoint, image_cmd = image_default(dockerfile)
        entrypoint = _as_argv(service.get("entrypoint"))
        command = _as_argv(service.get("command"))
        if entrypoint is not None:
            # Compose: setting `entrypoint` also clears the image's default command.
            argv = [*entrypoint, *(command or [])]
        else:
            argv = [*image_entrypoint, *(command if command is not None else image_cmd)]
        yield Invocation(f"docker-compose.yml: services.{name}", tuple(argv))


def k8s_invocations() -> Iterator[Invocation]:
    for path, doc in load_k8s():
        template = doc.get("spec", {}).get("template", {}).get("spec") if isinstance(doc.get("spec"), dict) else None
        if not template:
            continue
        for container in [*template.get("initContainers", []), *template.get("containers", [])]:
            dockerfile = _image_dockerfile(str(container.get("image", "")))
            if dockerfile is None:
                continue
            image_entrypoint, image_cmd = image_default(dockerfile)
            command = _as_argv(container.get("command"))
            args = _as_argv(container.get("args"))
            if command is not None:
                # Kubernetes: `command` replaces ENTRYPOINT and drops the image's CMD.
                argv = [*command, *(args or [])]
            else:
                argv = [*image_entrypoint, *(args if args is not None else image_cmd)]
            where = f"{path.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            yield Invocation(where, tuple(argv))


def all_invocations() -> list[Invocation]:
    return [*dockerfile_invocations(), *compose_invocations(), *k8s_invocations()]


# --------------------------------------------------------------------------------------------------
# Secrets.
# --------------------------------------------------------------------------------------------------

_SECRET_ASSIGNMENT = re.compile(
    r"(?i)[A-Za-z0-9_.-]*(?:password|passwd|secret|api_?key|basic_auth|auth_token)[A-Za-z0-9_.-]*"
    r"[\"']?[ \t]*[:=][ \t]*[\"']?(?P<value>[^\s\"',}\]#]+)"
)
_SECRET_FLAG = re.compile(r"(?i)--(?:requirepass|password|pass)\b[\"']?[\s,=]+[\"']?(?P<value>[^\s\"',\]]+)")
_URL_CREDENTIALS = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@\"']*:(?P<value>[^\s@/\"']+)@")


def is_placeholder(value: str) -> bool:
    """A value that is no secret: the documented placeholder, or a reference to a variable."""
    return PLACEHOLDER in value or value.startswith("$") or "${" in value or "$(" in value


def secret_literals(text: str) -> list[str]:
    """Lines that put a literal secret in a file: ``password: x``, ``--requirepass x``, ``scheme://u:x@``."""
    found: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        is_comment = line.lstrip().startswith("#")
        patterns = [_URL_CREDENTIALS] if is_comment else [_SECRET_ASSIGNMENT, _SECRET_FLAG, _URL_CREDENTIALS]
        for pattern in patterns:
            for m in pattern.finditer(line):
                if not is_placeholder(m["value"]):
                    found.append(f"line {number}: {line.strip()}")
    return found


# ==================================================================================================
# Tests of the helpers above, against a small fake CLI and small samples.
# ==================================================================================================


def _fake_cli() -> Any:
    app = typer.Typer(add_completion=False)

    @app.callback()
    def root(
        data_dir: Annotated[str | None, typer.Option()] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        pass

    @app.command("worker")
    def worker(
        model: Annotated[str, typer.Option("--model", "-m")] = "smollm2-135m-instruct",
        concurrency: Annotated[int, typer.Option(min=1)] = 1,
        gpu: Annotated[bool | None, typer.Option("--gpu/--cpu")] = None,
    ) -> None:
        pass

    @app.command("submit")
    def submit(
        path: str, model: Annotated[str, typer.Option()], chunk_size: Annotated[int, typer.Option()] = 100
    ) -> None:
        pass

    models = typer.Typer()

    @models.command("pull")
    def pull(name: str) -> None:
        pass

    @models.command("list")
    def list_() -> None:
        pass

    app.add_typer(models, name="models")
    return typer.main.get_command(app)


@pytest.mark.parametrize(
    ("argv", "leaf"),
    [
        (["worker"], "worker"),
        (["worker", "--model", "m", "--concurrency", "2", "--gpu"], "worker"),
        (["worker", "--gpu", "--model", "m"], "worker"),
        (["worker", "-m", "m:Q4_K_M", "--cpu"], "worker"),
        (["worker", "--concurrency=3"], "worker"),
        (["--verbose", "worker"], "worker"),
        (["--data-dir", "/data", "worker", "--cpu"], "worker"),
        (["submit", "in.jsonl", "--model", "m", "--chunk-size", "5"], "submit"),
        (["models", "pull", "smollm2-135m-instruct"], "pull"),
        (["models", "list"], "list"),
    ],
)
def test_resolve_cli_accepts_real_commands(argv: list[str], leaf: str) -> None:
    assert resolve_cli(_fake_cli(), argv)[-1] == leaf


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "needs a subcommand"),
        (["wroker"], "no command 'wroker'"),
        (["worker", "--threads", "2"], "no option --threads"),
        (["worker", "--threads=2"], "no option --threads"),
        (["--nope", "worker"], "no option --nope"),
        (["worker", "--model"], "needs a value"),
        (["worker", "--concurrency", "two"], "Invalid value for '--concurrency'"),
        (["worker", "--concurrency", "0"], "Invalid value for '--concurrency'"),
        (["worker", "stray"], "unexpected extra argument"),
        (["submit", "in.jsonl"], "Missing option '--model'"),
        (["models"], "needs a subcommand"),
        (["models", "push", "x"], "no command 'push'"),
    ],
)
def test_resolve_cli_rejects_what_the_cli_would(argv: list[str], message: str) -> None:
    with pytest.raises(CliMismatch, match=re.escape(message)):
        resolve_cli(_fake_cli(), argv)


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("${SET:-d}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}/${UNSET-d}", env) == "value/d/d//d"
    assert interpolate("$SET ${SET} $$SET $${SET}", env) == "value value $SET ${SET}"
    with pytest.raises(ValueError, match="required"):
        interpolate("${UNSET:?set it}", env)


def test_parse_dockerfile_joins_lines_and_reads_stages() -> None:
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "ARG TOP=1\n"
        "FROM --platform=linux/amd64 base:1 AS builder\n"
        'ARG FLAGS="-DA=on"\n'
        'ENV CMAKE_ARGS="${FLAGS} -DB=off" OTHER=x\n'
        "RUN echo one \\\n"
        "    # a comment inside\n"
        "    && echo two\n"
        "FROM base:2\n"
        'ENTRYPOINT ["tool"]\n'
        "CMD run --fast\n"
    )
    assert [(s.base, s.name) for s in stages] == [("base:1", "builder"), ("base:2", None)]
    assert stages[0].instructions[-1].args == "echo one && echo two"
    assert cmake_args(stages[0]) == ["-DA=on -DB=off"]
    assert exec_form(stages[1].last("ENTRYPOINT")) == ["tool"]
    assert exec_form(stages[1].last("CMD")) is None  # shell form


def test_secret_scanner_flags_literals_and_passes_placeholders() -> None:
    for leaked in (
        "password: hunter2",
        "POSTGRES_PASSWORD=hunter2",
        'command: ["redis-server", "--requirepass", "hunter2"]',
        "TOKENMILL_BROKER_URL: redis://:hunter2@redis:6379/0",
        "# postgresql://app:hunter2@db/app",
    ):
        assert secret_literals(leaked), leaked
    for fine in (
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:-change-me}",
        "value: postgresql://tokenmill:$(POSTGRES_PASSWORD)@$(POSTGRES_ADDRESS)/tokenmill",
        "REDIS_PASSWORD: change-me",
        "FLOWER_BASIC_AUTH: admin:change-me",
        'command: ["redis-server", "--requirepass", "${REDIS_PASSWORD:-change-me}"]',
        "secretKeyRef:",
        "- parameter: password",
        "# Passwords: put them in .env",
        '--from-literal=FLOWER_BASIC_AUTH="admin:$(openssl rand -hex 12)"',
    ):
        assert not secret_literals(fine), fine


# ==================================================================================================
# The files themselves.
# ==================================================================================================


@pytest.fixture(scope="module")
def tokenmill_cli() -> Any:
    try:
        from tokenmill.cli.app import app
    except ImportError as exc:
        pytest.fail(
            f"tokenmill.cli.app:app is not importable ({exc!r}), so the commands in docker-compose.yml, "
            "deploy/Dockerfile.* and deploy/k8s cannot be checked against the CLI",
            pytrace=False,
        )
    return typer.main.get_command(app)


def known_settings_env() -> set[str]:
    from tokenmill.config import Settings

    return set(Settings().as_env())


def test_every_yaml_file_parses() -> None:
    paths = [COMPOSE_FILE, *k8s_files()]
    assert len(paths) > 1, "no k8s manifests under deploy/k8s"
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_every_tokenmill_command_is_real(tokenmill_cli: Any) -> None:
    invocations = all_invocations()
    checked = [inv for inv in invocations if inv.program == "tokenmill"]
    assert len(checked) >= 8, f"expected tokenmill commands in every deploy file, found {checked}"
    problems: list[str] = []
    for inv in checked:
        try:
            resolve_cli(tokenmill_cli, inv.argv[1:])
        except CliMismatch as exc:
            problems.append(f"{inv.where}: {exc}")
    assert not problems, "commands the CLI would reject:\n" + "\n".join(problems)


def test_tokenmill_images_run_only_tokenmill_or_flower() -> None:
    for inv in all_invocations():
        assert inv.program in ("tokenmill", "celery"), (
            f"{inv.where} runs {shlex.join(inv.argv)!r}: tokenmill images run `tokenmill …` or Flower "
            "(`celery --app tokenmill.celery_app:app flower`) in exec form, with no shell around them"
        )


def test_flower_runs_on_tokenmills_celery_app() -> None:
    flowers = [inv for inv in all_invocations() if inv.program == "celery"]
    assert {inv.where.split(":")[0] for inv in flowers} >= {"docker-compose.yml", "deploy/k8s/40-flower.yaml"}
    for inv in flowers:
        argv = list(inv.argv[1:])
        app = option_value(argv, "--app") or option_value(argv, "-A")
        assert app == CELERY_APP, f"{inv.where}: Flower must load {CELERY_APP}, not {app!r}"
        assert "flower" in argv, f"{inv.where}: {shlex.join(inv.argv)} does not start Flower"
        assert argv.index("flower") > argv.index(next(a for a in argv if a.startswith(("--app", "-A")))), (
            f"{inv.where}: --app is a celery option and goes before `flower`"
        )


def test_celery_app_module_exposes_app() -> None:
    import celery

    from tokenmill import celery_app

    module_name, attr = CELERY_APP.split(":")
    assert celery_app.__name__ == module_name
    had_attr = attr in vars(celery_app)
    try:
        assert isinstance(getattr(celery_app, attr), celery.Celery)
    finally:
        if not had_attr:
            vars(celery_app).pop(attr, None)  # it is created lazily from the environment


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "builder_base", "runtime_base", "cmd"),
    [
        (DOCKERFILE_CPU, "python:3.11-slim", "python:3.11-slim", ["worker"]),
        (
            DOCKERFILE_CUDA,
            "nvidia/cuda:12.6.3-devel-ubuntu24.04",
            "nvidia/cuda:12.6.3-runtime-ubuntu24.04",
            ["worker", "--gpu"],
        ),
    ],
)
def test_dockerfile_is_multistage_non_root_with_tokenmill_entrypoint(
    path: Path, builder_base: str, runtime_base: str, cmd: list[str]
) -> None:
    stages = load_dockerfile(path)
    assert len(stages) >= 2, f"{path.name}: build wheels in a builder stage, install them in a runtime stage"
    builder, final = stages[0], stages[-1]
    assert (builder.base, final.base) == (builder_base, runtime_base)
    assert builder.name, f"{path.name}: name the builder stage (FROM … AS builder)"
    final_text = " ".join(ins.args for ins in final.instructions)
    assert f"from={builder.name}" in final_text or f"--from={builder.name}" in final_text, (
        f"{path.name}: the runtime stage takes nothing from the builder"
    )
    for tool in ("build-essential", "cmake", "nvcc"):
        assert tool not in final_text, f"{path.name}: {tool} belongs in the builder, not the runtime image"
    user = final.last("USER")
    assert user is not None and user.args.split(":")[0] not in ("root", "0"), f"{path.name}: run as non-root"
    assert exec_form(final.last("ENTRYPOINT")) == ["tokenmill"], f'{path.name}: ENTRYPOINT ["tokenmill"]'
    assert exec_form(final.last("CMD")) == cmd


@pytest.mark.parametrize("path", [DOCKERFILE_CPU, DOCKERFILE_CUDA])
def test_dockerfile_builds_the_pinned_llama_cpp_python_portably(path: Path) -> None:
    pin = re.search(r"llama-cpp-python==([\w.]+)", (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml no longer pins llama-cpp-python"
    builder = load_dockerfile(path)[0]
    variables = builder.variables()
    assert variables.get("LLAMA_CPP_PYTHON_VERSION") == pin[1], (
        f"{path.name} builds llama-cpp-python {variables.get('LLAMA_CPP_PYTHON_VERSION')}, pyproject pins {pin[1]}"
    )
    runs = [substitute(ins.args, variables) for ins in builder.instructions if ins.keyword == "RUN"]
    assert any(f"llama-cpp-python=={pin[1]}" in run for run in runs)
    flags = " ".join(cmake_args(builder) + [f for call in build_script_calls(builder) for f in call.flags()])
    assert re.search(r"-DGGML_NATIVE=OFF\b", flags, re.IGNORECASE), (
        f"{path.name}: without GGML_NATIVE=OFF the image only runs on CPUs like the build machine's"
    )


def test_cuda_dockerfile_compiles_llama_cpp_with_cuda() -> None:
    builder = load_dockerfile(DOCKERFILE_CUDA)[0]
    (call,) = build_script_calls(builder)
    flags = call.flags()
    assert any(re.search(r"-DGGML_CUDA=on\b", f, re.IGNORECASE) for f in flags), flags
    archs = builder.variables()["CUDA_ARCHITECTURES"]
    assert f"-DCMAKE_CUDA_ARCHITECTURES={archs}" in flags, "name the CUDA archs: no GPU at build time"
    assert not any(
        re.search(r"-DGGML_CUDA=on\b", f, re.IGNORECASE) for f in cmake_args(load_dockerfile(DOCKERFILE_CPU)[0])
    )


def test_the_cuda_image_and_the_gpu_run_build_llama_cpp_the_same_way() -> None:
    """deploy/Dockerfile.cuda and deploy/gpu/run.sh both compile through build_llama.sh with the cuda backend,
    and nothing else adds a cmake flag: the only difference is which architectures (all, or the local GPU's)."""
    builder = load_dockerfile(DOCKERFILE_CUDA)[0]
    (image,) = build_script_calls(builder)
    (gpu_run,) = run_script_calls()
    assert image.backend == gpu_run.backend == "cuda"
    image_flags = [f for f in image.flags() if "CMAKE_CUDA_ARCHITECTURES" not in f]
    run_flags = [f for f in gpu_run.flags() if "CMAKE_CUDA_ARCHITECTURES" not in f]
    assert image_flags == run_flags and "-DGGML_CUDA=ON" in run_flags
    assert len(image.flags()) == len(image_flags) + 1 == len(gpu_run.flags()) == len(run_flags) + 1
    # The one other CMAKE_ARGS in the image builds llama-cpp-python's Python part without any library, as
    # deploy/gpu/bundle.py does for the GPU run's wheel.
    assert cmake_args(builder) == ["-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"]
    assert '"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"' in (DEPLOY / "gpu" / "bundle.py").read_text()
    # The runtime image points llama-cpp-python at the libraries it copied from the builder.
    final = load_dockerfile(DOCKERFILE_CUDA)[-1]
    lib = final.variables()["LLAMA_CPP_LIB_PATH"]
    copies = [ins.args for ins in final.instructions if ins.keyword == "COPY"]
    assert any(c.startswith("--from=builder") and c.split()[-1] == lib for c in copies), copies
    builder_runs = " ".join(ins.args for ins in builder.instructions if ins.keyword == "RUN")
    assert f"{image.build}/bin/*.so*" in builder_runs and lib in builder_runs


def test_the_gpu_bundle_stays_out_of_git_and_the_build_context() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()]
    for folder in ("deploy/gpu/bundle", "deploy/gpu/work"):
        assert folder + "/" in ignored, f".gitignore must keep {folder} out of git (make gpu-bundle remakes it)"
        assert folder in patterns, f".dockerignore must keep {folder} out of the build context"
    assert not any(fnmatch.fnmatch("deploy/gpu/build_llama.sh", p) for p in patterns)


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for needed in ("pyproject.toml", "README.md", "tokenmill", "tokenmill/cli/app.py"):
        excluded = [p for p in patterns if fnmatch.fnmatch(needed, p) or needed.startswith(p.rstrip("/") + "/")]
        assert not excluded, f".dockerignore drops {needed} (by {excluded}) that `pip wheel .` needs"
    for private in (".venv", ".git", ".env"):
        assert private in patterns, f".dockerignore should keep {private} out of the build context"


# --- docker-compose.yml ----------------------------------------------------------------------------


def test_compose_has_the_services() -> None:
    services = load_compose()["services"]
    assert {"redis", "postgres", "scheduler", "worker-cpu", "worker-gpu", "flower"} <= set(services)


def test_compose_worker_cpu_can_scale() -> None:
    worker = load_compose()["services"]["worker-cpu"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, f"worker-cpu sets {key}: `docker compose up --scale worker-cpu=N` would clash"
    assert option_value(_as_argv(worker["command"]) or [], "--name") is None, "a fixed --name clashes across replicas"
    assert "replicas" not in worker.get("deploy", {}), "leave the count to --scale"
    assert "profiles" not in worker, "CPU workers start with a plain `docker compose up`"


def test_compose_worker_cpu_threads_fit_its_cpu_limit() -> None:
    worker = load_compose()["services"]["worker-cpu"]
    argv = _as_argv(worker["command"]) or []
    limit = worker["deploy"]["resources"]["limits"]["cpus"]
    threads = option_value(argv, "--threads")
    assert threads is not None, "worker-cpu must pass --threads: in a container the host's core count misleads"
    assert option_value(argv, "--concurrency") == "1"
    assert int(threads) <= float(limit), f"--threads {threads} on a {limit}-CPU limit"


def test_compose_worker_gpu_reserves_an_nvidia_gpu_in_the_gpu_profile() -> None:
    worker = load_compose()["services"]["worker-gpu"]
    assert "gpu" in worker.get("profiles", []), "keep the GPU worker in a profile so CPU-only hosts can `up`"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert "--gpu" in (_as_argv(worker.get("command")) or image_default(DOCKERFILE_CUDA)[1])
    assert worker["build"]["dockerfile"].endswith("Dockerfile.cuda")


def test_compose_dockerfiles_exist() -> None:
    services = load_compose()["services"]
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"scheduler", "worker-cpu", "worker-gpu", "flower"} <= set(built)
    for name, build in built.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"services.{name}.build: {dockerfile} does not exist"


def test_compose_waits_for_healthy_services() -> None:
    services = load_compose()["services"]
    for backing in ("redis", "postgres"):
        assert services[backing].get("healthcheck", {}).get("test"), f"{backing} needs a healthcheck"
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"services.{name}.depends_on: use the long form with conditions"
        for target, spec in depends.items():
            wanted = "service_completed_successfully" if target == "migrate" else "service_healthy"
            assert spec.get("condition") == wanted, f"services.{name} should wait for {target}: {wanted}"
    for name in ("scheduler", "worker-cpu", "worker-gpu"):
        assert {"redis", "postgres"} <= set(services[name]["depends_on"]), name
    assert "redis" in services["flower"]["depends_on"]


def test_compose_environment_points_at_the_services() -> None:
    compose = load_compose()
    known = known_settings_env()
    for name in ("scheduler", "worker-cpu", "worker-gpu", "flower", "migrate"):
        env = compose["services"][name]["environment"]
        assert isinstance(env, dict), f"services.{name}.environment: use the mapping form"
        unknown = {k for k in env if k.startswith("TOKENMILL_")} - known
        assert not unknown, f"services.{name} sets {unknown}, which tokenmill.config does not read"
        db, broker = urlsplit(env["TOKENMILL_DATABASE_URL"]), urlsplit(env["TOKENMILL_BROKER_URL"])
        assert (db.scheme, db.hostname, db.port, db.path) == ("postgresql", "postgres", 5432, "/tokenmill")
        assert (broker.scheme, broker.hostname, broker.port, broker.path) == ("redis", "redis", 6379, "/0")
    for name in ("worker-cpu", "worker-gpu"):
        service = compose["services"][name]
        models_dir = service["environment"]["TOKENMILL_MODELS_DIR"]
        volume = next((v for v in service.get("volumes", []) if v.split(":")[1] == models_dir), None)
        assert volume, f"services.{name}: mount the shared model cache at TOKENMILL_MODELS_DIR={models_dir}"
        assert volume.split(":")[0] in compose["volumes"], "the model cache is a named volume"


def test_compose_passwords_reach_every_url() -> None:
    """With POSTGRES_PASSWORD / REDIS_PASSWORD set in .env, the servers and every URL use them."""
    compose = load_compose({"POSTGRES_PASSWORD": "pg-pw-test", "REDIS_PASSWORD": "redis-pw-test"})
    services = compose["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-pw-test"
    redis_argv = _as_argv(services["redis"]["command"]) or []
    assert option_value(redis_argv, "--requirepass") == "redis-pw-test"
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == "redis-pw-test", "the healthcheck's password"
    for name in ("scheduler", "worker-cpu", "worker-gpu", "flower", "migrate"):
        env = services[name]["environment"]
        assert urlsplit(env["TOKENMILL_DATABASE_URL"]).password == "pg-pw-test", name
        assert urlsplit(env["TOKENMILL_BROKER_URL"]).password == "redis-pw-test", name


# --- Kubernetes ----------------------------------------------------------------------------------


def test_k8s_objects_have_identity_and_namespace() -> None:
    objects = load_k8s()
    assert objects, "no manifests in deploy/k8s"
    for path, doc in objects:
        for key in ("apiVersion", "kind"):
            assert doc.get(key), f"{path.name}: an object without {key}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: a {doc['kind']} without metadata.name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']} outside {NAMESPACE}"
    assert k8s_object("Namespace", NAMESPACE)


def test_k8s_deployments_select_their_own_pods() -> None:
    deployments = k8s_objects("Deployment")
    assert {d["metadata"]["name"].removeprefix("tokenmill-") for d in deployments} >= {
        "scheduler",
        "worker-cpu",
        "worker-gpu",
        "flower",
    }
    selectors = []
    for d in deployments:
        name = d["metadata"]["name"]
        match = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert match and all(labels.get(k) == v for k, v in match.items()), f"{name}: selector {match} vs {labels}"
        selectors.append(tuple(sorted(match.items())))
        for c in containers(d):
            assert c.get("image") and c.get("name"), f"{name}: a container without name or image"
            assert c.get("resources", {}).get("limits"), f"{name}/{c['name']}: set resource limits"
    assert len(selectors) == len(set(selectors)), "two Deployments select the same pods"


def test_k8s_scheduler_is_a_single_replica() -> None:
    scheduler = deployment_named("scheduler")
    assert scheduler["spec"]["replicas"] == 1
    assert scheduler["spec"]["strategy"]["type"] == "Recreate", "a rollout must not run two schedulers at once"


def test_k8s_worker_cpu_resources_match_its_threads() -> None:
    (worker,) = deployment_named("worker-cpu")["spec"]["template"]["spec"]["containers"]
    resources = worker["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    threads = option_value(worker["args"], "--threads")
    assert threads is not None, "pass --threads: a pod sees the node's cores"
    assert int(threads) <= cpu_quantity(resources["limits"]["cpu"])
    assert "replicas" not in deployment_named("worker-cpu")["spec"], "KEDA owns worker-cpu's replica count"


def test_k8s_gpu_worker_requests_a_gpu_on_a_gpu_node() -> None:
    deployment = deployment_named("worker-gpu")
    spec = pod_spec(deployment)
    (worker,) = spec["containers"]
    assert str(worker["resources"]["limits"].get("nvidia.com/gpu")) == "1"
    assert spec.get("nodeSelector") or spec.get("affinity"), "steer GPU workers onto GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), "tolerate the GPU taint"
    assert "cuda" in worker["image"]
    assert "--gpu" in worker["args"]


def test_k8s_env_references_resolve() -> None:
    known = known_settings_env()
    for d in k8s_objects("Deployment"):
        for c in containers(d):
            where = f"{d['metadata']['name']}/{c['name']}"
            for item in c.get("env", []):
                ref = item.get("valueFrom", {})
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if key in ref:
                        data = data_of(kind, ref[key]["name"])
                        assert ref[key]["key"] in data, f"{where}: {kind} {ref[key]['name']} has no {ref[key]['key']}"
                assert "value" not in item or isinstance(item["value"], str), (
                    f"{where}: env {item['name']} not a string"
                )
            env, unresolved = container_env(c)
            assert not unresolved, f"{where}: $({', '.join(unresolved)}) is defined nowhere before its use"
            unknown = {k for k in env if k.startswith("TOKENMILL_")} - known
            assert not unknown, f"{where}: {unknown} are not read by tokenmill.config"
            db, broker = urlsplit(env["TOKENMILL_DATABASE_URL"]), urlsplit(env["TOKENMILL_BROKER_URL"])
            assert db.scheme == "postgresql" and db.hostname and db.password == PLACEHOLDER, where
            assert broker.scheme == "redis" and broker.hostname and broker.password == PLACEHOLDER, where


def test_k8s_config_and_secret_hold_strings_and_placeholders() -> None:
    for cm in k8s_objects("ConfigMap"):
        bad = {k: v for k, v in cm.get("data", {}).items() if not isinstance(v, str)}
        assert not bad, f"ConfigMap {cm['metadata']['name']}: quote {bad} (ConfigMap values are strings)"
    secrets = k8s_objects("Secret")
    assert secrets
    for secret in secrets:
        assert "data" not in secret, "no base64 data in the repository: stringData placeholders only"
        for key, value in secret["stringData"].items():
            assert isinstance(value, str) and PLACEHOLDER in value, (
                f"Secret {key} must be a `{PLACEHOLDER}` placeholder"
            )


def test_k8s_placeholder_secret_stands_alone() -> None:
    """deploy/README.md applies every manifest but 15-secret.yaml, so real secrets are never overwritten."""
    holders = {path.name for path, doc in load_k8s() if doc["kind"] == "Secret"}
    assert holders == {"15-secret.yaml"}
    assert [doc["kind"] for path, doc in load_k8s() if path.name == "15-secret.yaml"] == ["Secret"]
    assert "15-secret.yaml" in DEPLOY_README.read_text()


def test_k8s_flower_service_reaches_flower() -> None:
    flower = deployment_named("flower")
    service = k8s_object("Service", flower["metadata"]["name"])
    labels = flower["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    ports = {p["name"]: p["containerPort"] for c in containers(flower) for p in c.get("ports", [])}
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in ports or target in ports.values(), f"Service targets {target}, flower exposes {ports}"
        assert ports.get(target, target) == 5555


def test_keda_scales_worker_cpu_on_its_celery_queue() -> None:
    from tokenmill.celery_app import queue_for

    (scaled,) = k8s_objects("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    worker = deployment_named("worker-cpu")
    assert target["name"] == worker["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert scaled["spec"]["minReplicaCount"] in (0, 1)
    assert scaled["spec"]["maxReplicaCount"] == 20
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert re.fullmatch(r"tm\.[a-z0-9][a-z0-9._-]*", meta["listName"]), meta["listName"]
    (container,) = pod_spec(worker)["containers"]
    model = option_value(container["args"], "--model") or option_value(container["args"], "-m")
    assert model, "worker-cpu must name its --model: the ScaledObject watches that family's queue"
    assert meta["listName"] == queue_for(model.split(":")[0]), "KEDA watches another queue than worker-cpu serves"
    assert isinstance(meta["listLength"], str) and int(meta["listLength"]) > 0, "KEDA metadata values are strings"
    env, _ = container_env(container)
    if "addressFromEnv" in meta:
        assert meta["addressFromEnv"] in env, "addressFromEnv names a variable the worker container does not have"
        address = env[meta["addressFromEnv"]]
    else:
        address = meta["address"]
    assert address.split(":")[0].count(".") >= 2, f"KEDA runs in its own namespace: use a FQDN, not {address!r}"
    auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (secret_ref,) = auth["spec"]["secretTargetRef"]
    assert secret_ref["parameter"] == "password"
    assert secret_ref["key"] in data_of("Secret", secret_ref["name"])


def test_keda_can_reach_its_max_replicas() -> None:
    """The scheduler caps the chunks queued + running per queue at max(TOKENMILL_MAX_INFLIGHT, 2 x live workers).

    KEDA asks for ceil(list length / listLength) replicas; with N workers busy (prefetch 1: each holds
    its running message outside the list) the list is the cap minus N. Reaching maxReplicaCount R takes a
    cap of (listLength + 1) x R: the 2 x N floor alone would settle at N / listLength and shrink the fleet.
    """
    (scaled,) = k8s_objects("ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    (container,) = pod_spec(deployment_named("worker-cpu"))["containers"]
    env, _ = container_env(container)
    inflight = int(env["TOKENMILL_MAX_INFLIGHT"])
    needed = (int(trigger["metadata"]["listLength"]) + 1) * scaled["spec"]["maxReplicaCount"]
    assert inflight >= needed, f"TOKENMILL_MAX_INFLIGHT={inflight} caps the queue below what {needed} workers need"


# --- secrets in every deploy file -------------------------------------------------------------------


def test_no_secret_literals_in_deploy_files() -> None:
    paths = [COMPOSE_FILE, DOCKERFILE_CPU, DOCKERFILE_CUDA, DOCKERIGNORE, DEPLOY_README, *k8s_files()]
    problems = [f"{path.relative_to(ROOT)} {hit}" for path in paths for hit in secret_literals(path.read_text())]
    assert not problems, f"secrets must be `{PLACEHOLDER}` placeholders or variables:\n" + "\n".join(problems)
