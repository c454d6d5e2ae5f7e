"""Evaluation of compile-time expressions on the AST.

Used for hyper-parameter defaults and overrides, model settings and the layer pattern. Tensor
expressions are not evaluated here (they become IR); meeting one is an error that says so.
"""

from __future__ import annotations

from typing import Callable, Mapping

from seqdsl.diagnostics import Span, did_you_mean, error, one_of
from seqdsl.frontend import ast
from seqdsl.ir.builtins import BUILTINS, INIT_RULES, PATTERN_FUNCTIONS, InitRule
from seqdsl.ir.values import (BINARY, BINOP_OF_TOKEN, FUNCTIONS, BlockRef, check_size, is_number,
                              type_name)

#: resolves a block name used in a pattern to a BlockRef factory, or None if not a block
BlockResolver = Callable[[str, ast.Expr], "str | None"]


class ConstEvaluator:
    def __init__(self, env: Mapping[str, object], *, blocks: BlockResolver | None = None,
                 what: str = "a compile-time constant", block_names: tuple[str, ...] = ()):
        self.env = dict(env)
        self.blocks = blocks
        self.what = what
        self.block_names = tuple(block_names)  # for "did you mean" in layer patterns

    # -- entry point
    def eval(self, e: ast.Expr) -> object:
        method = getattr(self, "_" + type(e).__name__)
        return method(e)

    def _Number(self, e: ast.Number):
        return e.value

    def _String(self, e: ast.String):
        return e.value

    def _Bool(self, e: ast.Bool):
        return e.value

    def _NoneLit(self, e: ast.NoneLit):
        return None

    def _Name(self, e: ast.Name):
        if e.id in self.env:
            return self.env[e.id]
        if e.id in INIT_RULES:
            return self._init_rule(e.id, (), (), e)
        if self.blocks is not None:
            kind = self.blocks(e.id, e)
            if kind == "block":
                return BlockRef(e.id, (), e.span)
        if e.id == "layer":
            raise error(e.span, f"'layer' is not known at compile time; it cannot be used in {self.what}",
                        "the layer index is only available inside block and mixer bodies")
        candidates = list(self.env) + list(INIT_RULES) + list(self.block_names)
        raise error(e.span, f"unknown name '{e.id}' in {self.what}", did_you_mean(e.id, candidates))

    def _UnaryOp(self, e: ast.UnaryOp):
        v = self.eval(e.operand)
        if e.op == "not":
            if not isinstance(v, bool):
                raise error(e.span, f"'not' needs a bool, got {type_name(v)}")
            return not v
        if not is_number(v):
            raise error(e.span, f"unary '{e.op}' needs a number, got {type_name(v)}")
        return -v if e.op == "-" else v

    def _BinOp(self, e: ast.BinOp):
        if e.op in ("and", "or"):
            a = self.eval(e.left)
            if not isinstance(a, bool):
                raise error(e.left.span, f"'{e.op}' needs bools, got {type_name(a)}")
            if (e.op == "and" and not a) or (e.op == "or" and a):
                return a
            b = self.eval(e.right)
            if not isinstance(b, bool):
                raise error(e.right.span, f"'{e.op}' needs bools, got {type_name(b)}")
            return b
        a, b = self.eval(e.left), self.eval(e.right)
        return BINARY[BINOP_OF_TOKEN[e.op]](a, b, e.op_span)

    def _IfExp(self, e: ast.IfExp):
        c = self.eval(e.cond)
        if not isinstance(c, bool):
            raise error(e.cond.span, f"a condition must be a bool, got {type_name(c)}")
        return self.eval(e.then if c else e.orelse)

    def _ListExpr(self, e: ast.ListExpr):
        return tuple(self.eval(i) for i in e.items)

    def _Index(self, e: ast.Index):
        v, i = self.eval(e.value), self.eval(e.index)
        if not isinstance(v, (tuple, str)):
            raise error(e.value.span, f"cannot index {'an' if type_name(v)[0] in 'aeiou' else 'a'} "
                        f"{type_name(v)}")
        if not isinstance(i, int) or isinstance(i, bool):
            raise error(e.index.span, f"an index must be an int, got {type_name(i)}")
        if not -len(v) <= i < len(v):
            raise error(e.index.span, f"index {i} is out of range for a list of {len(v)}")
        return v[i]

    def _Comprehension(self, e: ast.Comprehension):
        items = self.eval(e.iterable)
        if not isinstance(items, tuple):
            raise error(e.iterable.span, f"a comprehension iterates over a list, got {type_name(items)}",
                        "use range(n)")
        out = []
        saved = self.env.get(e.var, _MISSING)
        for item in items:
            self.env[e.var] = item
            out.append(self.eval(e.element))
        if saved is _MISSING:
            self.env.pop(e.var, None)
        else:
            self.env[e.var] = saved
        return tuple(out)

    def _Call(self, e: ast.Call):
        if e.func in INIT_RULES:
            return self._init_rule(e.func, e.args, e.kwargs, e)
        if e.func == "range":
            return self._range(e)
        if e.func in PATTERN_FUNCTIONS and self.blocks is not None:
            return getattr(self, "_pattern_" + e.func)(e)
        if self.blocks is not None:
            kind = self.blocks(e.func, e)
            if kind == "block":
                if e.args:
                    raise error(e.args[0].span, "block hyper-parameters are passed by name",
                                f"write {e.func}(name = value)")
                args = tuple(sorted((k.name, self.eval(k.value)) for k in e.kwargs))
                return BlockRef(e.func, args, e.span)
        b = BUILTINS.get(e.func)
        if b is not None and b.op in FUNCTIONS and not e.kwargs:
            if len(e.args) < len([a for a in b.args if a.required]) or \
                    (len(e.args) > len(b.args) and not b.variadic):
                raise error(e.func_span, f"{b.signature()} takes {len(b.args)} argument"
                            f"{'s' if len(b.args) != 1 else ''}, got {len(e.args)}")
            return FUNCTIONS[b.op]([self.eval(a) for a in e.args], e.span)
        if b is not None:
            raise error(e.func_span, f"'{e.func}' builds a tensor; {self.what} must be a "
                        "compile-time constant")
        raise error(e.func_span, f"unknown function '{e.func}' in {self.what}",
                    did_you_mean(e.func, [n for n, b in BUILTINS.items() if b.op in FUNCTIONS]
                                 + list(INIT_RULES) + list(self.block_names)))

    # -- helpers
    def _init_rule(self, name: str, args, kwargs, node) -> InitRule:
        spec = INIT_RULES[name]
        bound: dict[str, object] = {}
        span = node.span
        if len(args) > len(spec.args):
            raise error(span, f"init rule '{name}' takes {len(spec.args)} argument"
                        f"{'s' if len(spec.args) != 1 else ''}, got {len(args)}",
                        _rule_signature(name))
        for a, v in zip(spec.args, args):
            bound[a.name] = self.eval(v)
        for k in kwargs:
            if spec.args and k.name in [a.name for a in spec.args]:
                if k.name in bound:
                    raise error(k.span, f"argument '{k.name}' given twice")
                bound[k.name] = self.eval(k.value)
            else:
                raise error(k.span, f"init rule '{name}' has no argument '{k.name}'",
                            _rule_signature(name))
        for a in spec.args:
            if a.name not in bound:
                if a.required:
                    raise error(span, f"init rule '{name}' needs argument '{a.name}'",
                                _rule_signature(name))
                bound[a.name] = a.default
            if not is_number(bound[a.name]):
                raise error(span, f"argument '{a.name}' of init rule '{name}' must be a number, "
                            f"got {type_name(bound[a.name])}")
        return InitRule(name, tuple((a.name, bound[a.name]) for a in spec.args))

    def _range(self, e: ast.Call):
        vals = [self.eval(a) for a in e.args]
        if not 1 <= len(vals) <= 3 or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in vals) or e.kwargs:
            raise error(e.span, "range() takes one to three ints")
        if 0 in vals[2:]:
            raise error(e.span, "range() step must not be zero")
        r = range(*vals)
        check_size((r.stop - r.start) // r.step, e.span)
        return tuple(r)

    def _pattern_pattern(self, e: ast.Call):
        if len(e.args) != 1:
            raise error(e.func_span, 'pattern() takes one string and a legend: '
                        'pattern("MM*", M = a, "*" = b)')
        text = self.eval(e.args[0])
        if not isinstance(text, str):
            raise error(e.args[0].span, f"pattern() needs a string, got {type_name(text)}")
        legend: dict[str, BlockRef] = {}
        for k in e.kwargs:
            if len(k.name) != 1:
                raise error(k.span, f"legend keys are single characters, got '{k.name}'")
            v = self.eval(k.value)
            if not isinstance(v, BlockRef):
                raise error(k.value.span, f"legend entry '{k.name}' must be a block, got {type_name(v)}")
            legend[k.name] = v
        if not legend:
            raise error(e.span, "pattern() needs a legend mapping each character to a block")
        out = []
        for i, ch in enumerate(text):
            if ch in " |":  # visual separators, as in Megatron's hybrid patterns
                continue
            if ch not in legend:
                s = e.args[0].span
                col = s.col + 1 + i
                raise error(Span(s.path, s.line, col, s.line, col + 1),
                            f"character '{ch}' of the pattern has no legend entry",
                            f"the legend defines {one_of(legend)}")
            out.append(legend[ch])
        return tuple(out)

    def _pattern_periodic(self, e: ast.Call):
        args = [self.eval(a) for a in e.args]
        kw = {k.name: (self.eval(k.value), k) for k in e.kwargs}
        for k, (_, node) in kw.items():
            if k not in ("period", "offset"):
                raise error(node.span, f"periodic() has no argument '{k}'",
                            "periodic(n, base, other, period = p, offset = o)")
        if len(args) != 3 or "period" not in kw:
            raise error(e.func_span, "periodic() takes n, a base block, another block and "
                        "period = p (offset = o defaults to 0)")
        n, base, other = args
        period = kw["period"][0]
        offset = kw.get("offset", (0, None))[0]
        for label, v in (("n", n), ("period", period), ("offset", offset)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise error(e.span, f"periodic(): {label} must be an int, got {type_name(v)}")
        if period <= 0 or not 0 <= offset < period:
            raise error(e.span, f"periodic(): need period > 0 and 0 <= offset < period, "
                        f"got period={period}, offset={offset}")
        check_size(n, e.span)
        for label, v, node in (("base", base, e.args[1]), ("other", other, e.args[2])):
            if not isinstance(v, BlockRef):
                raise error(node.span, f"periodic(): {label} must be a block, got {type_name(v)}")
        return tuple(other if i % period == offset else base for i in range(n))


_MISSING = object()


def _rule_signature(name: str) -> str:
    spec = INIT_RULES[name]
    parts = [a.name if a.required else f"{a.name}={a.default}" for a in spec.args]
    return f"{name}({', '.join(parts)}): {spec.doc}"
