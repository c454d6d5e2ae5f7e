"""Parsing: .seq text → lark parse tree → AST (stage 1 of the pipeline).

The grammar lives in ``grammar/seq.lark`` (installed as ``seqdsl.grammar``). Parsing uses lark's
LALR(1) parser with a contextual lexer; a small post-lexer drops newlines inside brackets so calls
and lists may span lines. Syntax errors become :class:`SpecError` with the offending token's span
and a human list of what was expected.
"""

from __future__ import annotations

import functools
import importlib.resources
import math

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken,
                             VisitError)
from lark.lexer import PatternStr

from seqdsl.diagnostics import SourceRegistry, Span, SpecError, error
from seqdsl.frontend import ast
from seqdsl.ir.values import check_number

# Human names for terminals, used in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','",
    "EQUAL": "'='", "SEMICOLON": "';'", "_NL": "a newline", "$END": "end of file",
    "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '//' or '%'", "POW_OP": "'**'",
    "CMP_OP": "a comparison", "BLOCK": "'block'", "MIXER": "'mixer'",
    "CHANNEL": "'channel'", "FN": "'fn'",
    "OR": "'or'", "AND": "'and'", "NOT": "'not'", "TRUE": "'true'", "FALSE": "'false'",
    "NONE": "'none'", "IF": "'if'", "ELSE": "'else'", "FOR": "'for'", "IN": "'in'",
    "IMPORT": "'import'", "MODEL": "'model'", "SHARED": "'shared'", "RETURN": "'return'",
    "DOT": "'.'", "COLON": "':'",
}

_OPEN = {"LPAR", "LSQB"}
_CLOSE = {"RPAR", "RSQB"}


class _BracketPostLex:
    """Drops newline tokens inside (...) and [...], so expressions may span several lines.

    Also gives keywords back their type: the contextual lexer reads ``if`` as a NAME where no
    keyword fits (``if = 1``), which would make keywords usable as names."""

    always_accept = ("_NL",)
    keywords: dict[str, str] = {}  # keyword -> terminal name, set by _parser()

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in _OPEN:
                depth += 1
            elif tok.type in _CLOSE:
                depth = max(depth - 1, 0)
            elif tok.type == "_NL" and depth > 0:
                continue
            elif tok.type == "NAME" and tok.value in self.keywords:
                tok = Token.new_borrow_pos(self.keywords[tok.value], tok.value, tok)
            yield tok


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    text = importlib.resources.files("seqdsl.grammar").joinpath("seq.lark").read_text()
    postlex = _BracketPostLex()
    lark = Lark(text, parser="lalr", lexer="contextual", postlex=postlex,
                propagate_positions=True, maybe_placeholders=True, start=["start", "expr"])
    postlex.keywords = {t.pattern.value: t.name for t in lark.terminals
                        if isinstance(t.pattern, PatternStr) and t.pattern.value.isidentifier()}
    return lark


def _tok_span(path: str, tok: Token) -> Span:
    return Span(path, tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + len(str(tok)))


def _meta_span(path: str, meta) -> Span:
    return Span(path, meta.line, meta.column, meta.end_line, meta.end_column)


def _number(text: str, span: Span) -> int | float:
    """A numeric literal, which must fit what generated code holds (a float64, an int64) and
    must not underflow to zero."""
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if value in (math.inf, -math.inf):
        raise error(span, f"the number {text} is too large for a float64",
                    "numbers must stay within ±1.8e308")
    check_number(value, span, f"the number {text}")
    if value == 0 and any(c in "123456789" for c in text.split("e")[0].split("E")[0]):
        raise error(span, f"the number {text} is too small for a float64: it would be 0",
                    "nonzero numbers must be at least about 4.9e-324 in size")
    return value


class _ToAst(Transformer):
    """Turns lark's tree into :mod:`seqdsl.frontend.ast` nodes."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _span(self, meta) -> Span:
        return _meta_span(self.path, meta)

    def _tspan(self, tok: Token) -> Span:
        return _tok_span(self.path, tok)

    # -- atoms
    @v_args(meta=True)
    def number(self, meta, children):
        return ast.Number(_number(str(children[0]), self._span(meta)), self._span(meta))

    @v_args(meta=True)
    def string(self, meta, children):
        return ast.String(str(children[0])[1:-1], self._span(meta))

    @v_args(meta=True)
    def true(self, meta, children):
        return ast.Bool(True, self._span(meta))

    @v_args(meta=True)
    def false(self, meta, children):
        return ast.Bool(False, self._span(meta))

    @v_args(meta=True)
    def none(self, meta, children):
        return ast.NoneLit(self._span(meta))

    @v_args(meta=True)
    def name(self, meta, children):
        return ast.Name(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def list(self, meta, children):
        return ast.ListExpr(tuple(c for c in children if c is not None), self._span(meta))

    @v_args(meta=True)
    def comprehension(self, meta, children):
        element, var, iterable = children
        return ast.Comprehension(element, str(var), iterable, self._span(meta), self._tspan(var))

    # -- operators
    @v_args(meta=True)
    def binop(self, meta, children):
        left, op, right = children
        return ast.BinOp(str(op), left, right, self._span(meta), self._tspan(op))

    boolop = binop
    compare = binop

    @v_args(meta=True)
    def unary(self, meta, children):
        op, operand = children
        return ast.UnaryOp(str(op), operand, self._span(meta))

    @v_args(meta=True)
    def ifexp(self, meta, children):
        then, cond, orelse = children
        return ast.IfExp(cond, then, orelse, self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, arguments = children
        args, kwargs = [], []
        for a in arguments or ():
            (kwargs if isinstance(a, ast.Keyword) else args).append(a)
        return ast.Call(str(func), tuple(args), tuple(kwargs), self._span(meta), self._tspan(func))

    def arguments(self, children):
        return [c for c in children if c is not None]

    @v_args(meta=True)
    def keyword(self, meta, children):
        key, value = children
        quoted = key.type == "STRING"
        name = str(key)[1:-1] if quoted else str(key)
        return ast.Keyword(name, value, self._tspan(key), quoted)

    @v_args(meta=True)
    def index(self, meta, children):
        value, idx = children
        return ast.Index(value, idx, self._span(meta))

    # -- statements
    @v_args(meta=True)
    def assign(self, meta, children):
        *targets, value = children
        return ast.Assign(tuple(str(t) for t in targets), tuple(self._tspan(t) for t in targets),
                          value, self._span(meta))

    @v_args(meta=True)
    def shared(self, meta, children):
        name, value = children
        return ast.Shared(str(name), value, self._span(meta), self._tspan(name))

    @v_args(meta=True)
    def return_stmt(self, meta, children):
        return ast.Return(children[0], self._span(meta))

    def body(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def param(self, meta, children):
        name, default = children
        return ast.Param(str(name), default, self._tspan(name))

    def params(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def definition(self, meta, children):
        kind, name, params, body = children
        return ast.Definition(str(kind), str(name), params or (), body, self._span(meta),
                              self._tspan(name))

    @v_args(meta=True)
    def model_def(self, meta, children):
        name, params, body = children
        return ast.ModelDef(str(name), params or (), body, self._span(meta), self._tspan(name))

    @v_args(meta=True)
    def import_stmt(self, meta, children):
        return ast.Import(str(children[0])[1:-1], self._span(meta))

    def start(self, children):
        items = [c for c in children if c is not None]
        return ast.Module(
            self.path,
            tuple(i for i in items if isinstance(i, ast.Import)),
            tuple(i for i in items if isinstance(i, ast.Definition)),
            tuple(i for i in items if isinstance(i, ast.ModelDef)),
        )


def _acceptable(exc: UnexpectedInput):
    """What the parser would take here. LALR's `expected` also lists lookaheads merged in from
    other contexts (a statement 'expecting' 'block'); `accepts` tries each one."""
    return getattr(exc, "accepts", None) or exc.expected


def _expected(exc: UnexpectedInput) -> str:
    terminals = {t for t in (_acceptable(exc) or ()) if not t.startswith("__")}
    if len(terminals) > 1:
        terminals.discard("_NL")  # the post-lexer always accepts newlines; rarely informative
    names = sorted({_TERMINAL_NAMES.get(t, f"'{t.lower()}'") for t in terminals})
    if not names:
        return ""
    if len(names) > 8:
        names = names[:8] + ["..."]
    return "expected " + ", ".join(names)


def _describe(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "$END":
        return "end of file"
    return f"'{tok}'"


def parse(text: str, path: str = "<string>", start: str = "start"):
    """Parse one file's text into an AST Module (or an expression with ``start="expr"``);
    raises SpecError on a syntax error."""
    SourceRegistry.add(path, text)
    if start == "start" and not text.endswith("\n"):
        text += "\n"
    try:
        tree = _parser().parse(text, start=start)
    except UnexpectedToken as exc:
        tok = exc.token
        if tok.type == "$END":
            line = text.rstrip("\n").count("\n") + 1
            span = Span(path, line, len(text.rstrip("\n").split("\n")[-1]) + 1, line,
                        len(text.rstrip("\n").split("\n")[-1]) + 2)
        else:
            span = _tok_span(path, tok)
            if tok.type == "_NL":
                span = Span(path, tok.line, tok.column, tok.line, tok.column + 1)
        hint = _hint_for(exc, text)
        raise error(span, f"unexpected {_describe(tok)}; {_expected(exc)}".rstrip("; "),
                    hint) from None
    except UnexpectedCharacters as exc:
        span = Span(path, exc.line, exc.column, exc.line, exc.column + 1)
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else "?"
        hint = "strings use double quotes" if ch == "'" else \
            "the string is not closed on this line" if ch == '"' else None
        raise error(span, f"unexpected character {ch!r}", hint) from None
    except UnexpectedEOF as exc:  # pragma: no cover - LALR reports $END as UnexpectedToken
        line = text.count("\n")
        raise error(Span(path, line, 1, line, 2), f"unexpected end of file; {_expected(exc)}") \
            from None
    deep = _too_deep(tree)
    if deep is not None:
        raise error(_meta_span(path, deep.meta), f"too deeply nested: more than {MAX_NESTING} levels",
                    "split the expression into several assignments")
    try:
        return _ToAst(path).transform(tree)
    except VisitError as exc:      # a SpecError raised inside the transformer (a bad literal)
        if isinstance(exc.orig_exc, SpecError):
            raise exc.orig_exc from None
        raise


#: parse trees deeper than this would overflow Python's stack in the recursive passes
MAX_NESTING = 200


def _too_deep(tree: Tree) -> Tree | None:
    """The first subtree found below MAX_NESTING levels, if any (iteratively: no recursion)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            return node
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))
    return None


def _unclosed(text: str, end: int, opener: str) -> tuple[int, int] | None:
    """Line and column of the innermost ``opener`` still open at offset ``end``."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[tuple[str, int, int]] = []
    line, col, i = 1, 1, 0
    while i < min(end, len(text)):
        ch = text[i]
        if ch == "#":  # skip a comment, up to its newline
            stop = text.find("\n", i)
            i = len(text) if stop == -1 else stop
            continue
        if ch == '"':  # skip a string (an unterminated one is the lexer's to report)
            stop = text.find('"', i + 1)
            if stop != -1 and "\n" not in text[i:stop]:
                col += stop + 1 - i
                i = stop + 1
                continue
        if ch in "([{":
            stack.append((ch, line, col))
        elif ch in pairs and stack and stack[-1][0] == pairs[ch]:
            stack.pop()
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1
    for ch, l, c in reversed(stack):
        if ch == opener:
            return l, c
    return None


def _hint_for(exc: UnexpectedToken, text: str = "") -> str | None:
    expected = set(_acceptable(exc) or ())
    tok = exc.token
    pos = len(text) if tok.type == "$END" else getattr(tok, "start_pos", None)
    for term, opener in (("RPAR", "("), ("RSQB", "["), ("RBRACE", "{")):
        if term in expected and tok.type in ("RBRACE", "$END", "_NL") and pos is not None:
            where = _unclosed(text, pos, opener)
            if where is not None:
                return f"the '{opener}' at line {where[0]}, column {where[1]} is not closed"
    if tok.type == "_NL" and "RPAR" in expected:
        return "a '(' is not closed"
    if tok.type == "_NL" and "RSQB" in expected:
        return "a '[' is not closed"
    if tok.type == "$END" and "RBRACE" in expected:
        return "a '{' is not closed"
    if tok.type == "EQUAL" and "EQUAL" not in expected:
        return "use '==' to compare; '=' only assigns or names a keyword argument"
    if tok.value in _parser().options.postlex.keywords and "NAME" in expected \
            and "NUMBER" not in expected:  # where a name, not an expression, must come
        return f"'{tok.value}' is a keyword and cannot be used as a name"
    if tok.type == "NAME" and "EQUAL" in expected:
        return "a statement is 'name = expression', 'shared name = expression' or 'return expression'"
    return None


def parse_value(text: str, origin: str) -> object:
    """Parse a literal given on the command line (``512``, ``1e-3``, ``true``, ``"gelu"``).

    A bare word that is not a literal is taken as a string, so ``--set act=gelu`` works.
    """
    from seqdsl.frontend.consteval import ConstEvaluator

    stripped = text.strip()
    if stripped.isidentifier() and stripped not in ("true", "false", "none"):
        return stripped
    expr = parse(stripped, origin, start="expr")
    return ConstEvaluator({}, what=f"the value of {origin}").eval(expr)
