"""Answers of benchmark responses: extraction, normalisation and equivalence (the usual rules).

* ``extract_answer``: the last ``\\boxed{...}`` (nested braces), else "answer is ...", else the last number;
  ``extract_choice``: a multiple-choice letter.
* ``normalize_answer`` / ``is_equivalent``: LaTeX fractions, commas in numbers, units, percent and degree signs are
  normalised, and numbers are compared numerically (``\\frac{1}{2}`` == ``0.5``).
"""
from __future__ import annotations

import re
from fractions import Fraction

CHOICE_LETTERS = "ABCD"


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and equivalence
# ----------------------------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces; ``\\boxed 5`` also works."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for match in reversed(starts):
        position = match.end()
        if position < len(text) and text[position] == "{":
            depth = 0
            for end in range(position, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    return text[position + 1:end].strip()
            continue  # unbalanced: try an earlier one
        bare = re.match(r"[^\s$]+", text[position:])
        if bare:
            return bare.group(0).strip()
    return None


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def extract_answer(response: str) -> str | None:
    """The final answer in a model response: last ``\\boxed{}``, else "answer is X", else "#### X", else the last
    number; None when there is nothing to extract."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    said = re.findall(r"answer is[:\s]*\$?([^\n$]+?)\$?(?:\.\s|\.?$|\n)", response, flags=re.IGNORECASE)
    if said:
        return said[-1].strip()
    hashes = re.findall(r"####\s*([^\n]+)", response)
    if hashes:
        return hashes[-1].strip()
    numbers = re.findall(_NUMBER, response)
    return numbers[-1] if numbers else None


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer: what follows ``####`` in its solution (commas kept; normalisation removes them)."""
    if "####" not in solution:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got {solution[-60:]!r}")
    return solution.split("####")[-1].strip()


_UNITS = ("cm", "m", "km", "mm", "inches", "inch", "in", "feet", "foot", "ft", "yards", "yd", "miles", "mph",
          "meters", "meter", "centimeters", "degrees", "degree", "dollars", "dollar", "cents", "cent", "units",
          "unit", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day", "years", "year",
          "pounds", "lbs", "kg", "g", "grams", "liters", "ml", "sq", "square", "cubic", "students", "people")


def normalize_answer(answer: str | int | float | None) -> str:
    """A canonical string for comparing answers (MATH-style normalisation, plus GSM8K commas and units)."""
    if answer is None:
        return ""
    text = str(answer).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("\n", " ").strip().strip("$").strip()
    text = re.sub(r"\\text\{\s*([^{}]*)\}", r" \1 ", text)  # \text{ cm} -> cm (a unit, dropped below)
    text = re.sub(r"\\(?:mbox|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", text)
    for pattern in (r"\\left", r"\\right", r"\\!", r"\\,", r"\\;", r"\\:", r"\\ ", r"\\displaystyle"):
        text = re.sub(pattern, "", text)
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text)
    text = text.replace("°", "").replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)  # \frac12 -> \frac{1}{2}
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = text.strip()
    if re.fullmatch(r"[A-Za-z]\s*=.*", text):  # "x = 5" -> "5"
        text = text.split("=", 1)[1]
    unit = re.compile(r"\s+(?:" + "|".join(_UNITS) + r")\.?\s*(?:\^\s*\{?\d\}?)?\s*$", re.IGNORECASE)
    while unit.search(text) and unit.sub("", text).strip():
        text = unit.sub("", text)
    text = "".join(text.split()).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):  # 1,234 -> 1234
        text = text.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*?0+", text):  # 2.50 -> 2.5, 3.0 -> 3
        text = text.rstrip("0").rstrip(".")
    if re.fullmatch(r"\{.*\}", text):
        text = text[1:-1]
    return text


def to_number(text: str) -> Fraction | float | None:
    """The exact value of a normalised numeric answer (integers, decimals, ``a/b``, ``\\frac{a}{b}``, a sign), or
    None when it is not a plain number (e.g. symbolic)."""
    text = text.replace(" ", "")
    sign = 1
    if text.startswith("-"):
        sign, text = -1, text[1:]
    match = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", text) or re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", text)
    try:
        if match:
            denominator = Fraction(match.group(2))
            return None if denominator == 0 else sign * Fraction(match.group(1)) / denominator
        if re.fullmatch(r"\d+(\.\d+)?|\.\d+", text):
            return sign * Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _symbolic(text: str):
    """A sympy expression for simple LaTeX (fractions, roots, pi, powers), or None."""
    expression = text
    for _ in range(3):
        expression = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", expression)
        expression = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", expression)
    expression = re.sub(r"\\sqrt(\d)", r"sqrt(\1)", expression)
    expression = expression.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    expression = expression.replace("^", "**").replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[0-9a-z+\-*/(). ]+", expression) or re.search(r"[a-z]{2,}", expression.replace(
            "sqrt", "").replace("pi", "")):
        return None
    try:
        from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                                standard_transformations)

        return parse_expr(expression, transformations=standard_transformations + (
            implicit_multiplication_application,), evaluate=True)
    except Exception:  # noqa: BLE001 - anything sympy cannot parse is simply not symbolic-equal
        return None


def is_equivalent(prediction: str | None, gold: str | int | float, tolerance: float = 1e-6) -> bool:
    """True when ``prediction`` equals ``gold`` after normalisation, numerically (relative ``tolerance``), or
    symbolically (sympy: ``\\frac{\\sqrt{2}}{2}`` == ``\\frac{1}{\\sqrt{2}}``)."""
    if prediction is None:
        return False
    a, b = normalize_answer(prediction), normalize_answer(gold)
    if not a:
        return False
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return abs(float(x) - float(y)) <= tolerance * max(1.0, abs(float(y)))
    if x is None and y is None and a.lower() == b.lower():
        return True
    left, right = _symbolic(a), _symbolic(b)
    if left is None or right is None:
        return False
    try:
        import sympy

        return bool(sympy.simplify(left - right) == 0)
    except Exception:  # noqa: BLE001
        return False


def extract_choice(response: str) -> str | None:
    """A multiple-choice letter A-D: boxed, "answer is (X)", "Answer: X", else the last standalone letter."""
    boxed = last_boxed(response)
    if boxed is not None:
        found = re.fullmatch(r"\(?([A-D])\)?", normalize_answer(boxed).replace("\\text", ""))
        if found:
            return found.group(1)
    for pattern in (r"answer is\s*:?\s*\(?([A-D])\)?", r"[Aa]nswer\s*:\s*\(?([A-D])\)?"):
        found = re.findall(pattern, response)
        if found:
            return found[-1]
    found = re.findall(r"\b([A-D])\b", response)
    return found[-1] if found else None
