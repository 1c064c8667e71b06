"""A safe parser for spec expressions: SymPy syntax over a whitelist of names.

Spec text is never passed to ``eval`` or ``sympify``. Python's ``ast`` module only
*parses* the text; this module walks the tree, accepts a fixed set of node types
(numbers, arithmetic, comparisons, calls of whitelisted functions, subscripts of declared
tensors) and builds the SymPy objects itself. Anything else -- attribute access,
lambdas, dunder names, strings, unknown functions or names -- is a :class:`SpecError`
naming the file, the expression and the offending name.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass, field

import sympy
from sympy.core.parameters import distribute

from .errors import SpecError
from .functions import CONSTANTS, FUNCTIONS, REDUCTIONS, RELATIONS
from .ir import index as index_symbol


@dataclass
class Scope:
    """The names an expression may use, and what each one is."""

    path: str
    tensors: dict[str, int] = field(default_factory=dict)  # name -> rank (0: scalar)
    symbols: dict[str, sympy.Symbol] = field(default_factory=dict)  # dims, attrs, hyper
    indices: dict[str, sympy.Symbol] = field(default_factory=dict)  # filled while parsing
    tensor_base: dict[str, sympy.IndexedBase] = field(default_factory=dict)
    # an optimizer's update lines: ``sum(expr)`` (no index) reduces over every element
    # of the parameter, read at this index
    whole: sympy.Symbol | None = None

    def base(self, name: str) -> sympy.IndexedBase:
        if name not in self.tensor_base:
            self.tensor_base[name] = sympy.IndexedBase(name, real=True)
        return self.tensor_base[name]

    def scalar(self, name: str) -> sympy.Symbol:
        return sympy.Symbol(name, real=True)

    def index(self, name: str) -> sympy.Symbol:
        if name not in self.indices:
            self.indices[name] = index_symbol(name)
        return self.indices[name]


# the largest denominator an exponent keeps exactly: SymPy's polynomial algorithms (factor,
# cancel) write x**(p/q) as a power of the generator x**(1/q), and a computed exponent
# such as sin(0.5) = 479425538604203/10**15 made a dense polynomial of that degree (the
# derivation never finished)
EXACT_DENOMINATOR = 1000


def exact(e):
    """An exponent as the exact rational a spec writes (0.5 -> 1/2, 1.5 -> 3/2, 0.333 ->
    333/1000), and one with a denominator over EXACT_DENOMINATOR (a computed sin(0.5),
    or 1/3 written as 0.3333333) as the float it is."""
    if isinstance(e, sympy.Float):
        r = sympy.Rational(repr(float(e)))
        return r if r.q <= EXACT_DENOMINATOR else e
    if isinstance(e, sympy.Rational) and e.q > EXACT_DENOMINATOR:
        return sympy.Float(e)
    return e


def _times(a, b):
    """a * b; a decimal times a sum stays that product, as written (SymPy would
    distribute 0.79*(x + 0.044715*x**3) into 0.0357*x**3 + 0.79*x, and the derivation's
    forward definition would not show the spec's own constants)."""
    if (isinstance(a, sympy.Float) and isinstance(b, sympy.Add)) or (isinstance(b, sympy.Float) and isinstance(a, sympy.Add)):
        with distribute(False):
            return a * b
    return a * b


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: _times,
    ast.Div: lambda a, b: a / b,
    # an exponent is exact (x**0.5 is sqrt(x), x**1.5 is x**(3/2)): SymPy's power rules
    # and the printers' square roots and reciprocals apply to rational exponents
    ast.Pow: lambda a, b: a ** exact(b),
    ast.FloorDiv: lambda a, b: sympy.floor(a / b),
    ast.Mod: lambda a, b: sympy.Mod(a, b),
}

_COMPARE = {
    ast.Lt: sympy.Lt,
    ast.LtE: sympy.Le,
    ast.Gt: sympy.Gt,
    ast.GtE: sympy.Ge,
    ast.Eq: sympy.Eq,
    ast.NotEq: sympy.Ne,
}

_NODE_NAMES = {
    ast.Attribute: "attribute access",
    ast.Lambda: "a lambda",
    ast.Starred: "star arguments",
    ast.IfExp: "a Python conditional expression (use where(cond, a, b))",
    ast.ListComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.List: "a list",
    ast.NamedExpr: "an assignment expression",
    ast.JoinedStr: "a string",
    ast.Await: "await",
    ast.Yield: "yield",
}


# names from other languages and libraries, and what the spec language writes instead
ALIASES = {
    "ln": "log",
    "pow": "a**b",
    "power": "a**b",
    "arctan": "atan",
    "arcsin": "asin",
    "arccos": "acos",
    "arcsinh": "asinh",
    "arccosh": "acosh",
    "arctanh": "atanh",
    "avg": "mean(expr, i)",
    "average": "mean(expr, i)",
    "clip": "Max(lo, Min(x, hi))",
    "clamp": "Max(lo, Min(x, hi))",
    "heaviside": "where(x > 0, 1, 0)",
    "logsumexp": "log(sum(exp(expr), i))",
    "softmax": "exp(x[b,i]) / sum(exp(x[b,j]), j)",
    "ifelse": "where(cond, a, b)",
    "select": "where(cond, a, b)",
}

_BINOP_HINTS = {
    "BitXor": " (a power is written `**`, e.g. x**2)",
    "BitAnd": " (a conjunction is written `and` or And(a, b))",
    "BitOr": " (a disjunction is written `or` or Or(a, b))",
    "MatMult": " (write the product as a sum over an index, e.g. sum(w[o,i]*x[b,i], i))",
    "LShift": "",
    "RShift": "",
}


def closest(name: str, candidates) -> str | None:
    """The candidate closest to ``name`` (case-insensitive, difflib's ratio), or None."""
    candidates = sorted(set(candidates))
    lowered = [c.lower() for c in candidates]
    best = difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.6)
    return candidates[lowered.index(best[0])] if best else None


def near_match(name: str, candidates) -> str:
    """`` (did you mean `X`?)`` for the candidate closest to ``name``, or an alias's
    replacement (``ln`` -> ``log``), or ``""``."""
    suggestion = ALIASES.get(name.lower()) or closest(name, candidates)
    return f" (did you mean `{suggestion}`?)" if suggestion else ""


class ExprParser:
    """Builds SymPy from one expression's syntax tree, checking every name."""

    def __init__(self, scope: Scope, text: str, index_names: set[str], reads: list | None = None):
        self.scope = scope
        self.text = text
        self.index_names = index_names
        # every tensor read and reduction as written, before SymPy's evaluation can cancel
        # it (w/w is 1, 0 * max(x[j], j) is 0): an index takes its range from these reads
        # and is bound by these reductions (derive/spec.py bind)
        self.reads = [] if reads is None else reads

    def fail(self, problem: str):
        raise SpecError(self.scope.path, problem, self.text)

    def build(self, node):
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            what = _NODE_NAMES.get(type(node), f"the construct `{type(node).__name__}`")
            self.fail(f"{what} is not allowed in a spec expression")
        return method(node)

    def visit_Expression(self, node):
        return self.build(node.body)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"the literal {value!r} is not a number")
        if isinstance(value, int) or value.is_integer():
            return sympy.Integer(int(value))
        # a decimal stays the float it is written as: derivations print it (and what is
        # computed from it, 3 * 0.044715 = 0.134145) as a decimal, the kernels as a typed
        # literal; an exact rational here (8943/200000) made SymPy's simplification pull
        # out common denominators and print 5e-22 * (3989422804014327 * ...)
        return sympy.Float(repr(value))  # from the text: its precision keeps every digit written

    def visit_BinOp(self, node):
        op = _BINOPS.get(type(node.op))
        if op is None:
            what = type(node.op).__name__
            self.fail(f"the operator `{what}` is not allowed{_BINOP_HINTS.get(what, '')}")
        return op(self.build(node.left), self.build(node.right))

    def visit_UnaryOp(self, node):
        operand = self.build(node.operand)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return operand
        if isinstance(node.op, ast.Not):
            return sympy.Not(operand)
        self.fail(f"the operator `{type(node.op).__name__}` is not allowed")

    def visit_Compare(self, node):
        parts = []
        left = self.build(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.build(comparator)
            rel = _COMPARE.get(type(op))
            if rel is None:
                self.fail(f"the comparison `{type(op).__name__}` is not allowed")
            parts.append(rel(left, right))
            left = right
        return sympy.And(*parts) if len(parts) > 1 else parts[0]

    def visit_BoolOp(self, node):
        values = [self.build(v) for v in node.values]
        return sympy.And(*values) if isinstance(node.op, ast.And) else sympy.Or(*values)

    def _check_name(self, name: str):
        if name.startswith("_"):
            self.fail(f"the name `{name}` is not allowed (names may not start with '_')")

    def visit_Name(self, node):
        name = node.id
        self._check_name(name)
        if name in self.index_names:
            return self.scope.index(name)
        if name in self.scope.symbols:
            return self.scope.symbols[name]
        if name in self.scope.tensors:
            if self.scope.tensors[name] != 0:
                self.fail(
                    f"tensor `{name}` has rank {self.scope.tensors[name]} and must be "
                    f"read with {self.scope.tensors[name]} indices, e.g. {name}[...]"
                )
            return self.scope.scalar(name)
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in FUNCTIONS or name in REDUCTIONS:
            self.fail(f"the function `{name}` is used without calling it")
        known = [*self.scope.symbols, *self.scope.tensors, *CONSTANTS, *self.index_names]
        self.fail(f"unknown name `{name}`{near_match(name, known)}")

    def visit_Call(self, node):
        if not isinstance(node.func, ast.Name):
            func = node.func
            if isinstance(func, ast.Attribute) and not func.attr.startswith("_"):
                plain = closest(func.attr, [*FUNCTIONS, *REDUCTIONS])
                if plain:
                    self.fail(f"only whitelisted functions may be called, by their plain name: write `{plain}(...)`, "
                              f"not `{ast.unparse(func)}(...)`")
            self.fail("only whitelisted functions may be called, by their plain name")
        name = node.func.id
        self._check_name(name)
        keywords = {}
        if node.keywords:
            if name != "reduce" or [k.arg for k in node.keywords] != ["weight"]:
                self.fail(f"`{name}` takes positional arguments only" + (" and `weight=`" if name == "reduce" else ""))
            keywords["weight"] = self.build(node.keywords[0].value)
        if name == "reduce" and self.scope.whole is not None:
            self.fail("`reduce(expr, i, ...)` is a loss's reduction (PyTorch's `reduction`), not an update's; use sum or mean")
        if name in REDUCTIONS:
            if len(node.args) == 1 and self.scope.whole is not None:
                reduction = REDUCTIONS[name](self.build(node.args[0]), self.scope.whole)
                self.reads.append(reduction)
                return reduction
            if len(node.args) < 2:
                self.fail(f"`{name}(expr, i, ...)` needs an expression and at least one index")
            indices = []
            for arg in node.args[1:]:
                if not isinstance(arg, ast.Name):
                    other = {"max": " (the larger of two values is Max(a, b))"}.get(name, "")
                    self.fail(f"the reduction indices of `{name}` must be plain index names{other}")
                self._check_name(arg.id)
                indices.append(self.scope.index(arg.id))
            reduction = REDUCTIONS[name](self.build(node.args[0]), *indices, **keywords)
            self.reads.append(reduction)
            return reduction
        if name not in FUNCTIONS:
            if name in self.scope.tensors:
                self.fail(f"`{name}` is a tensor, not a function: read it with square brackets, {name}[...]")
            self.fail(f"unknown function `{name}`{near_match(name, [*FUNCTIONS, *REDUCTIONS])}")
        if name in RELATIONS and name not in ("And", "Or") and len(node.args) != (1 if name == "Not" else 2):
            self.fail(f"`{name}` takes {'one argument' if name == 'Not' else 'two arguments'}, got {len(node.args)}")
        args = [self.build(a) for a in node.args]
        try:
            return FUNCTIONS[name](*args)
        except TypeError as exc:
            self.fail(f"bad arguments to `{name}`: {exc}")

    def visit_Subscript(self, node):
        if not isinstance(node.value, ast.Name):
            self.fail("only declared tensors may be indexed")
        name = node.value.id
        self._check_name(name)
        if name not in self.scope.tensors:
            tensors = [t for t, rank in self.scope.tensors.items() if rank]
            self.fail(f"unknown tensor `{name}`{near_match(name, tensors)}")
        slc = node.slice
        items = slc.elts if isinstance(slc, ast.Tuple) else [slc]
        rank = self.scope.tensors[name]
        if len(items) != rank:
            self.fail(f"tensor `{name}` has rank {rank} but is read with {len(items)} indices")
        idx = [self.build(item) for item in items]
        read = self.scope.base(name)[tuple(idx)]
        self.reads.append(read)
        return read

    def visit_Tuple(self, node):
        self.fail("a tuple is not allowed here")


def _parse_tree(text: str, path: str, mode: str):
    try:
        return ast.parse(text.strip(), mode=mode)
    except SyntaxError as exc:
        raise SpecError(path, f"syntax error: {exc.msg}", text) from None


def _collect_index_names(tree, scope: Scope) -> set[str]:
    """Names used as indices: inside subscripts (outside nested calls' function names)
    and as reduction variables. Dimension and attribute names are never indices."""
    names: set[str] = set()

    def visit_slice(n):
        tensor_names = {id(s.value) for s in ast.walk(n) if isinstance(s, ast.Subscript)}
        called = {id(s.func) for s in ast.walk(n) if isinstance(s, ast.Call)}
        for sub in ast.walk(n):
            if (isinstance(sub, ast.Name) and id(sub) not in tensor_names and id(sub) not in called
                    and sub.id not in scope.symbols and sub.id not in scope.tensors):
                names.add(sub.id)

    for n in ast.walk(tree):
        if isinstance(n, ast.Subscript):
            visit_slice(n.slice)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in REDUCTIONS:
            for arg in n.args[1:]:
                if isinstance(arg, ast.Name):
                    names.add(arg.id)
    return names


def parse_expression(text: str, scope: Scope, extra_indices: set[str] = frozenset()):
    """Parse one expression; returns a SymPy expression."""
    if not isinstance(text, str):
        raise SpecError(scope.path, f"expected an expression string, got {text!r}")
    tree = _parse_tree(text, scope.path, "eval")
    names = _collect_index_names(tree, scope) | set(extra_indices) | set(scope.indices)
    return ExprParser(scope, text, names).build(tree)


def parse_equation(text: str, scope: Scope, extra_indices: set[str] = frozenset(), reads: list | None = None):
    """Parse ``lhs = rhs``; returns (target name, lhs index symbols, rhs expression).
    ``reads``, if given, receives every tensor read and reduction of the right-hand side
    as written."""
    if not isinstance(text, str):
        raise SpecError(scope.path, f"expected an equation string, got {text!r}")
    tree = _parse_tree(text, scope.path, "exec")
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign) or len(tree.body[0].targets) != 1:
        raise SpecError(scope.path, "an equation must have the form `target[i, ...] = expression`", text)
    stmt = tree.body[0]
    target = stmt.targets[0]
    names = _collect_index_names(tree, scope) | set(extra_indices) | set(scope.indices)
    parser = ExprParser(scope, text, names, reads)
    if isinstance(target, ast.Name):
        parser._check_name(target.id)
        lhs_name, lhs_idx = target.id, ()
    elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
        lhs_name = target.value.id
        parser._check_name(lhs_name)
        items = target.slice.elts if isinstance(target.slice, ast.Tuple) else [target.slice]
        lhs_idx = []
        for item in items:
            if not isinstance(item, ast.Name) or item.id in scope.symbols:
                raise SpecError(
                    scope.path, "the left-hand side must be indexed by plain index names", text
                )
            parser._check_name(item.id)
            lhs_idx.append(scope.index(item.id))
        if len(set(lhs_idx)) != len(lhs_idx):
            raise SpecError(scope.path, "an index repeats on the left-hand side", text)
        lhs_idx = tuple(lhs_idx)
    else:
        raise SpecError(scope.path, "the left-hand side must be a tensor name or tensor[i, ...]", text)
    rhs = parser.build(stmt.value)
    return lhs_name, lhs_idx, rhs
