"""``--chat-template``: a template file or the template itself, checked before the model loads.

As in vLLM, the value is read as a file when one exists at that path; otherwise a value with Jinja's characters
(``{``, ``}`` or a newline) is the template itself, and anything else is a path that does not exist (an error, not a
template that would render the path's text)."""
from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

_JINJA_CHARS = "{}\n"


def load_chat_template(value: str) -> str:
    """The template text of ``--chat-template`` (a path or the template); a ``ValueError`` naming the flag when
    the file cannot be read or the template does not compile."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--chat-template: cannot read {path}: {exc}") from None
        source = path
    elif any(c in value for c in _JINJA_CHARS):
        template, source = value, "the command line"
    else:
        raise ValueError(f"--chat-template: {value!r} looks like a path, but there is no file there (an inline "
                         "template holds Jinja's {{ }} or {% %})")
    if not template.strip():
        raise ValueError(f"--chat-template: the template from {source} is empty")
    try:
        _compile(template)
    except Exception as exc:  # noqa: BLE001 - any compile failure is a bad flag value
        raise ValueError(f"--chat-template: the template from {source} does not compile: {exc}") from None
    logger.info("chat template: %d characters from %s", len(template), source)
    return template


def _compile(template: str) -> Any:
    """Compile as transformers will when it renders (its environment has extra tags such as ``generation``)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # a transformers without it: Jinja's own parser, with the loop controls it enables
        import jinja2

        compile_template = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string
    return compile_template(template)


def apply_chat_template(tokenizer: Any, template: str) -> None:
    """Make ``template`` the tokenizer's: every chat request (and ``/tokenize`` of messages) renders with it."""
    if tokenizer is None:
        raise ValueError("--chat-template needs a tokenizer, and this model has none")
    tokenizer.chat_template = template
