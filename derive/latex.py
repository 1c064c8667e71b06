"""Derivations for people: the steps of each op's derivation as LaTeX.

A derivation is a list of blocks, ``("text", str)`` or ``("math", latex)``, rendered as
a LaTeX fragment (``op.latex()``), a standalone .tex document, or Markdown with ``$$``
math. Gradients are written with bars: ``\\bar{x}`` is dL/dx for the scalar L being
differentiated, so ``\\bar{y}`` is the incoming output gradient.
"""

from __future__ import annotations

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from .spec import OpDef


def tex_name(name: str) -> str:
    """A tensor's name in LaTeX: gradients barred, tangents dotted, long names upright."""
    if name.startswith("g_"):
        return r"\bar{%s}" % tex_name(name[2:])
    if name.startswith("t_"):
        return r"\dot{%s}" % tex_name(name[2:])
    if "_" in name or len(name) > 2 and name not in ("lse",):
        return r"\mathrm{%s}" % name.replace("_", r"\_")
    return name


class DerivationPrinter(LatexPrinter):
    """LaTeX with gradient bars, tensor names upright, and ``names``: tensors shown under
    another name (the sums a derivation named, e.g. ``\\Sigma^{(0)}``)."""

    _default_settings = {**LatexPrinter._default_settings, "names": {}}

    def _tensor(self, name):
        return self._settings["names"].get(name) or tex_name(name)

    def _print_Indexed(self, expr):
        idx = ",".join(self._print(i) for i in expr.indices)
        return "%s_{%s}" % (self._tensor(str(expr.base)), idx)

    def _hprint_Function(self, func: str) -> str:
        """A function's name whole, upright: SymPy reads trailing digits as a subscript
        (expm1 printed as expm_{1}); a function name is one word."""
        from sympy.printing.latex import accepted_latex_functions

        if len(func) > 1 and func.isalnum() and func not in accepted_latex_functions:
            return r"\operatorname{%s}" % func
        return super()._hprint_Function(func)

    def _print_Symbol(self, expr, style="plain"):
        if expr.name in self._settings["names"] or expr.name.startswith(("g_", "t_")) or "_" in expr.name:
            return self._tensor(expr.name)
        return super()._print_Symbol(expr)

    def _print_And(self, expr):
        """A conjunction with its bounds chained: ``0 \\le e < H`` for ``e >= 0 \\wedge H > e``.

        Guards of zero-padded reads come out of the derivation as four separate
        inequalities per window; a reader knows them as two ranges."""
        bounds = [_as_bound(arg) for arg in expr.args]
        used = [False] * len(bounds)
        parts = []
        for i, bound in enumerate(bounds):
            if used[i]:
                continue
            used[i] = True
            if bound is None:
                parts.append(self._print(expr.args[i]))
                continue
            chain = list(bound)  # low, rel, high
            for j in range(i + 1, len(bounds)):
                other = bounds[j]
                if used[j] or other is None:
                    continue
                if other[0] == chain[-1]:  # low < e, e < high
                    chain += other[1:]
                elif other[2] == chain[0]:  # e < high, low < e
                    chain = list(other[:2]) + chain
                else:
                    continue
                used[j] = True
                break
            parts.append(" ".join(t if isinstance(t, str) else self._print(t) for t in chain))
        return r" \wedge ".join(parts)

    # numbers: a rational that is a decimal fraction (a denominator dividing a power of
    # ten, with a factor 5) prints as that decimal, as a spec writes it (the parser keeps
    # 0.044715 exact as 8943/200000; its derivative's 0.134145 prints so too); halves,
    # quarters and other binary fractions stay fractions (x/2 as in a textbook)

    def _print_Rational(self, expr):
        return decimal_tex(expr) or super()._print_Rational(expr)

    def _print_Float(self, expr):
        """A float as its shortest decimal (Python's repr): 0.134145, not 0.134145000000000."""
        value = float(expr)
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return decimal_tex(sympy.Rational(repr(value))) or super()._print_Float(expr)

    def _print_Mul(self, expr):
        coeff, rest = expr.as_coeff_Mul()
        if isinstance(coeff, sympy.Float) and abs(float(coeff)) == 1 and rest != 1:
            return self._print(rest if coeff > 0 else -rest)  # 1.0 x is x
        if isinstance(coeff, sympy.Float):
            coeff = sympy.Rational(repr(float(coeff)))
        if coeff.is_Rational and coeff.is_negative and decimal_tex(-coeff) and rest != 1:
            return "- " + self._print_Mul(-expr)
        if decimal_tex(coeff) and rest != 1:
            num, den = sympy.fraction(rest)
            if den != 1:  # 0.1 / x, not 0.1 (1/x)
                top = decimal_tex(coeff) if num == 1 else "%s %s" % (decimal_tex(coeff), self.parenthesize(num, PRECEDENCE["Mul"], strict=True))
                return r"\frac{%s}{%s}" % (top, self._print(den))
            return "%s %s" % (decimal_tex(coeff), self.parenthesize(rest, PRECEDENCE["Mul"], strict=True))
        return super()._print_Mul(expr)

    def _print_Pow(self, expr):
        e = expr.exp
        if e.is_Rational and decimal_tex(abs(e)):
            if e.is_negative:
                return r"\frac{1}{%s}" % self._print(sympy.Pow(expr.base, -e, evaluate=False))
            if expr.base.is_Function:
                return self._print(expr.base, exp=decimal_tex(e))
            return self._helper_print_standard_power(expr, r"%s^{%s}")
        return super()._print_Pow(expr)

    def _print_KroneckerDelta(self, expr, exp=None):
        return r"\delta_{%s,\,%s}" % (self._print(expr.args[0]), self._print(expr.args[1]))

    def _print_Sum(self, expr):
        """``\\sum_{d'} body``, as the chain-rule lines write sums (ranges are whole)."""
        body = self._print(expr.function)
        if expr.function.is_Add or expr.function.could_extract_minus_sign():
            body = r"\left(%s\right)" % body
        return r"\sum_{%s} %s" % (",".join(self._print(lim[0]) for lim in expr.limits), body)


def decimal_tex(r) -> str | None:
    """A rational that is a decimal fraction as its exact decimal (``0.044715``; below
    1e-4 as ``1.5 \\cdot 10^{-8}``), None for any other number."""
    if not isinstance(r, sympy.Rational) or r.is_Integer:
        return None
    q, twos, fives = r.q, 0, 0
    while q % 2 == 0:
        q, twos = q // 2, twos + 1
    while q % 5 == 0:
        q, fives = q // 5, fives + 1
    if q != 1 or fives == 0:
        return None
    k = max(twos, fives)
    digits = str(abs(r.p) * 10**k // r.q)
    sign = "-" if r.p < 0 else ""
    if abs(r) < sympy.Rational(1, 10**4):
        mantissa = digits[0] + ("." + digits[1:].rstrip("0") if digits[1:].rstrip("0") else "")
        power = r"10^{%d}" % (len(digits) - 1 - k)
        return sign + (power if mantissa == "1" else r"%s \cdot %s" % (mantissa, power))
    digits = digits.rjust(k + 1, "0")
    return "%s%s.%s" % (sign, digits[:-k], digits[-k:])


def _as_bound(rel):
    """``(low, "<" or "\\le", high)`` for an inequality, None for anything else."""
    if isinstance(rel, (sympy.StrictLessThan, sympy.LessThan)):
        low, high = rel.lhs, rel.rhs
    elif isinstance(rel, (sympy.StrictGreaterThan, sympy.GreaterThan)):
        low, high = rel.rhs, rel.lhs
    else:
        return None
    strict = isinstance(rel, (sympy.StrictLessThan, sympy.StrictGreaterThan))
    return low, "<" if strict else r"\le", high


_printer = DerivationPrinter({"mul_symbol": None})


def tex(expr, names=None) -> str:
    if names:
        return DerivationPrinter({"mul_symbol": None, "names": names}).doprint(expr)
    return _printer.doprint(expr)


def _lhs(name, idx, names=None):
    shown = (names or {}).get(name) or tex_name(name)
    if not idx:
        return shown
    return "%s_{%s}" % (shown, ",".join(tex(i) for i in idx))


def _sum_prefix(indices):
    if not indices:
        return ""
    return r"\sum_{%s} " % ",".join(tex(i) for i in indices)


def _stmt_tex(s):
    body = tex(s.body)
    if s.reduce == "sum":
        body = _sum_prefix(s.over) + r"\left(" + body + r"\right)"
    elif s.reduce == "max":
        body = r"\max_{%s} " % ",".join(tex(i) for i in s.over) + body
    return f"{_lhs(s.target, s.free)} = {body}"


def _guards_tex(guards):
    parts = []
    for g in guards:
        if g.kind == "range":
            parts.append(r"%s \le %s < %s" % (tex(g.lo), tex(g.expr), tex(g.hi)))
        elif g.kind == "eq":
            parts.append(r"%s = %s" % (tex(g.expr), tex(g.other)))
        else:
            parts.append(r"%s \mid %s" % (tex(g.other), tex(g.expr)))
    return parts


def _term_tex(t):
    if t.scatter:
        lhs = "%s_{%s}" % (tex_name(t.grad), ",".join(tex(a) for a in t.scatter))
        inner = _sum_prefix([i for i, _, _ in t.scatter_over])
        loops = ",".join(tex(i) for i, _, _ in t.loops)
        return r"%s \mathrel{+}= %s%s \quad \text{for every } (%s)\ \text{(scatter-add)}" % (lhs, inner, tex(t.expr), loops)
    lhs = _lhs(t.grad, t.free)
    prefix = ""
    if t.loops:
        bounds = []
        for i, lo, hi in t.loops:
            bounds.append(r"%s=%s" % (tex(i), tex(lo)) + r"}^{" + tex(hi - 1))
        prefix = "".join(r"\sum_{" + b + "} " for b in bounds)
    guard = ""
    if t.guards:
        guard = r"\left[" + r",\ ".join(_guards_tex(t.guards)) + r"\right]"
    return r"%s \mathrel{+}= %s%s\,%s" % (lhs, prefix, guard, tex(t.expr))


def derivation_blocks(op: OpDef, stmts, backward, program) -> list[tuple[str, str]]:
    blocks: list[tuple[str, str]] = []
    add = blocks.append
    add(("heading", op.name))
    if op.doc:
        add(("text", op.doc))
    add(("text", "Forward definition (the spec):"))
    for eq in op.equations:
        add(("math", f"{_lhs(eq.target, eq.index)} = {tex(eq.rhs)}"))
    if op.relations:
        facts = ", ".join(f"{tex_name(d)} = {tex(e)}" for d, e in op.relations.items())
        add(("text", f"Sizes (checked when the op runs; the derivation drops the bounds guards they prove): ${facts}$."))
    extra = [s for s in stmts if s.origin != "spec"]
    if extra:
        add(("text", "Normalised statements (each reduction its own intermediate; stability rewrites applied):"))
        for s in stmts:
            line = _stmt_tex(s)
            if s.stop_gradient:
                line += r"\quad(\text{stop-gradient})"
            add(("math", line))
            if s.note:
                add(("text", s.note + "."))
    if not backward.terms and not backward.inlined:
        return blocks
    add(("text", r"Reverse mode: $\bar{t}$ denotes the gradient of the final scalar with respect to $t$. For each read, the local partial derivative, the chain rule with Kronecker deltas, and the contracted gather form:"))
    for t in _all_terms_in_order(backward):
        add(("text", f"Through the read ${tex(t.read)}$ in the statement for ${tex_name(t.stmt.target)}$:"))
        d = r"\frac{\partial %s}{\partial %s} = %s" % (_lhs(t.stmt.target, t.stmt.free), tex(t.read), tex(t.local))
        if t.stmt.reduce == "max":
            d += r"\quad\text{(at the first maximal element, 0 elsewhere)}"
        add(("math", d))
        if isinstance(t.read, sympy.Indexed):
            add(("math", r"%s \mathrel{+}= %s%s" % (_lhs(t.grad, t.chain_free), _sum_prefix(t.chain_over), tex(t.chain))))
            for kind, lhs, rhs in t.steps:
                if kind == "assume":
                    add(("text", f"Using the assumption ${tex(lhs)} = {tex(rhs)}$:"))
                elif kind == "digits":
                    rest = [i for i, _, _ in t.loops if rhs.has(i)]  # the remainder below the lowest stride
                    which = (f"the ${tex(lhs)}$ with these digits are ${tex(lhs)} = {tex(rhs)}$ for each "
                             f"${tex(rest[0])}$ below the lowest stride" if rest else
                             f"${tex(lhs)} = {tex(rhs)}$ is the only ${tex(lhs)}$ with these digits")
                    add(("text", f"The indices that hold ${tex(lhs)}$ are its mixed-radix digits (each stride the one "
                                 f"below times its radix): {which}, so the deltas contract to a gather:"))
        add(("math", _term_tex(t)))
        for kind, lhs, rhs in t.steps:
            if kind == "closed":
                add(("text", f"The sum is known from the forward pass: $\\sum {tex(lhs)} = {tex(rhs)}$ "
                             "(by linearity and the forward's own sums)."))
    read_outputs = getattr(backward, "read_outputs", {})
    if read_outputs:
        shown = ", ".join(f"${tex_name(o)}$" for o in dict.fromkeys(read_outputs.values()))
        add(("text", f"Outputs that later statements read ({shown}): the gradient that flows into each is "
                     "its own incoming gradient plus the contributions through those reads"
                     + (":" if any(g in backward.inlined for g in read_outputs) else " (gathered above).")))
        for g, (free, expr) in backward.inlined.items():
            if g in read_outputs:
                add(("math", f"{_lhs(g, free)} = {tex(expr)}"))
    inlined = {g: v for g, v in backward.inlined.items() if g not in read_outputs}
    if inlined:
        add(("text", "Gradients of intermediates that are elementwise and therefore substituted, not stored:"))
        for g, (free, expr) in inlined.items():
            add(("math", f"{_lhs(g, free)} = {tex(expr)}"))
    names = sum_names(backward)
    for step in backward.rewrites:
        add(("text", step.caption))
        for g, free, expr in step.equations:
            add(("math", f"{_lhs(g, free, names)} = {tex(expr, names)}"))
    add(("text", "Result: the vector-Jacobian products the kernels compute:"))
    for a in program.backward:
        add(("math", _assign_tex(a, names)))
    blocks.extend(second_order_blocks(program, names))
    return blocks


def second_order_blocks(program, names=None) -> list[tuple[str, str]]:
    """Forward mode and the Hessian-vector product (derive/tangent.py), as the kernels
    compute them."""
    if not program.jvp:
        return []
    dotted = ", ".join(f"${tex_name(t.name)}$" for t in program.tangents)
    blocks = [("text", "Forward mode: $\\dot{t}$ denotes the derivative of $t$ along the tangents "
                       f"{dotted} of the differentiable arguments (the Jacobian-vector product):")]
    blocks += [("math", _assign_tex(a, names)) for a in program.jvp]
    shown = {(a.target, str(a.body)) for a in program.jvp}
    rest = [a for a in program.hvp if (a.target, str(a.body)) not in shown]
    blocks.append(("text", "Second order (forward over reverse): the derivative of each vector-Jacobian product "
                           "along the same tangents, the output gradients held fixed (the Hessian-vector product; "
                           "the forward's tangents as above):"))
    blocks += [("math", _assign_tex(a, names)) for a in rest]
    return blocks


def sum_names(backward) -> dict[str, str]:
    """How the derivation writes the sums it named: ``g_x_sum0`` is ``\\Sigma^{(0)}``."""
    return {n: r"\Sigma^{(%d)}" % k for k, n in enumerate(backward.named_sums)}


def _all_terms_in_order(backward):
    return list(getattr(backward, "all_terms", backward.terms))


def _assign_tex(a, names=None):
    lhs = _lhs(a.target, [lp.index for lp in a.free], names)
    body = a.body
    prefix = ""
    for lp in a.over:
        prefix += r"\sum_{%s=%s}^{%s} " % (tex(lp.index), tex(lp.lo), tex(lp.hi - 1))
    op = r"\mathrel{+}=" if a.accumulate else "="
    return f"{lhs} {op} {prefix}{tex(body, names)}"


def optimizer_blocks(op: OpDef):
    blocks = [("heading", op.name)]
    if op.doc:
        blocks.append(("text", op.doc))
    hyper = ", ".join(f"{tex_name(k)} = {v}" for k, v in op.hyper.items())
    blocks.append(("text", f"Elementwise update of parameter $p$ with gradient $g$ at step $t$ (from 1); defaults: ${hyper}$."))
    if op.scalar_state:
        scalars = ", ".join(f"{tex_name(k)} = {v}" for k, v in op.scalar_state.items())
        blocks.append(("text", f"Per-step scalar state (one number, updated once per step), initially ${scalars}$."))
    for eq in op.equations:
        blocks.append(("math", r"%s \leftarrow %s" % (tex_name(eq.target), tex(eq.rhs))))
    return blocks


def schedule_blocks(op: OpDef):
    blocks = [("heading", op.name)]
    if op.doc:
        blocks.append(("text", op.doc))
    blocks.append(("math", r"\mathrm{lr}_t = %s" % tex(op.expr)))
    return blocks


_SPECIAL = {"_": r"\_", "^": r"\^{}", "&": r"\&", "%": r"\%", "#": r"\#", "~": r"\~{}",
            "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def _plain(text: str) -> str:
    """Prose (an op's doc string) with LaTeX's special characters escaped."""
    return "".join(_SPECIAL.get(ch, ch) for ch in text)


def render_tex(blocks, level="subsection*", fit=False) -> str:
    """A LaTeX fragment; ``fit`` (for a document with TEX_PREAMBLE) shrinks a display
    that is wider than the line to the line's width instead of letting it run off
    the page."""
    out = []
    for kind, text in blocks:
        if kind == "heading":
            out.append("\\%s{%s}" % (level, _plain(text)))
        elif kind == "text":
            out.append(_plain(text) if "$" not in text else text)
        else:
            body = "\\fitdisplay{%s}" % text if fit else text
            out.append("\\begin{equation*}\n" + body + "\n\\end{equation*}")
    return "\n\n".join(out) + "\n"


def render_md(blocks) -> str:
    out = []
    for kind, text in blocks:
        if kind == "heading":
            out.append(f"## `{text}`")
        elif kind == "text":
            out.append(text)
        else:
            out.append("$$\n" + text + "\n$$")
    return "\n\n".join(out) + "\n"


def derivation_latex(op, stmts, backward, program) -> str:
    return render_tex(derivation_blocks(op, stmts, backward, program))


def optimizer_latex(op) -> str:
    return render_tex(optimizer_blocks(op))


def schedule_latex(op) -> str:
    return render_tex(schedule_blocks(op))


TEX_PREAMBLE = r"""\documentclass[11pt]{article}
\usepackage{amsmath,amssymb,graphicx}
\usepackage[margin=2cm]{geometry}
\allowdisplaybreaks
\sloppy  % long identifiers in the prose (torch.nn.functional...) go to the next line, not into the margin
% A display wider than the line is scaled down to the line's width (render_tex's fit).
\newsavebox{\fitbox}
\newcommand{\fitdisplay}[1]{%
  \sbox{\fitbox}{$\displaystyle #1$}%
  \ifdim\wd\fitbox>\linewidth\resizebox{\linewidth}{!}{\usebox{\fitbox}}\else\usebox{\fitbox}\fi}
\begin{document}
"""
