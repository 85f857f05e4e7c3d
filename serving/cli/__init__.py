"""`indexcache` command line. Each subcommand lives in its own module with `register(subparsers)`.

Modules are imported lazily by name so `indexcache --help` stays fast and a subcommand's heavy
imports (Ray, Locust) are paid only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module name -> (subcommand, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "make_tiny": ("make-tiny", "write a tiny random DSA checkpoint with a tokenizer"),
    "generate": ("generate", "generate text offline with the engine"),
    "calibrate": ("calibrate", "search an IndexCache F/S plan on calibration data"),
    "distill": ("distill", "train F-layer indexers for an IndexCache plan (others frozen)"),
    "convert_smollm2": ("convert-smollm2", "SmolLM2-135M-Instruct as a dsa_llama checkpoint"),
    "serve": ("serve", "serve the OpenAI-compatible API with Ray Serve"),
    "plans": ("plans", "list, show and publish IndexCache plans in the plan registry"),
    "render_k8s": ("render-k8s", "render the KubeRay serveConfigV2 of a serving YAML"),
    "loadtest": ("loadtest", "Locust load test of a running server, with a report and plots"),
}


class CommandFailed(RuntimeError):
    """A subcommand could not do its job; the message is one line naming the cause."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="indexcache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module, (name, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        mod = importlib.import_module(f"serving.cli.{module}")
        mod.register(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ValueError as e:  # bad input: the whole message (a config error names each field)
        print(f"indexcache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError) as e:  # files, ports, connections: the first line says it
        print(f"indexcache {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except CommandFailed as e:  # already one line naming the cause
        print(f"indexcache {args.command}: error: {e}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
