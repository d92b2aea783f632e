"""Seeded generator of multi-step arithmetic/algebra word problems with worked solutions.

Every problem is built from randomly drawn quantities, solved exactly (fractions.Fraction) and
written out three ways: the problem statement, a step-by-step solution ending in \\boxed{answer}
(SFT stage 1) and a longer "thinking" trace that restates, computes and double-checks (SFT stage 2).
Quantities run to three or four digits and every answer needs three to six dependent operations,
which a 135M-parameter model does not get right by pattern matching.

Simplifications: English templates with a fixed phrasing per template (names, items and numbers
vary); answers are integers, fractions or terminating decimals only.

About 400 lines because it is a table of templates, each a small function; one file keeps them side by side.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yusuf"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("mug", "mugs"), ("ticket", "tickets"), ("lamp", "lamps"),
         ("book", "books"), ("plant", "plants"), ("scarf", "scarves"), ("puzzle", "puzzles"), ("candle", "candles")]


@dataclass
class Generated:
    template: str
    problem: str
    steps: list[str]
    answer: str
    checks: list[str] = field(default_factory=list)


def fmt(x: Fraction | int) -> str:
    """Exact LaTeX form: integer, terminating decimal when short, else \\frac{p}{q}."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:
        s = f"{float(x):.6f}".rstrip("0").rstrip(".")
        if Fraction(s) == x and len(s) <= 10:
            return s
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def _pick2(rng: random.Random, seq):
    a, b = rng.sample(seq, 2)
    return a, b


def shopping_change(rng: random.Random) -> Generated:
    name = rng.choice(NAMES)
    (_, i1s), (_, i2s) = _pick2(rng, ITEMS)
    while True:
        a, p, b, q = rng.randint(3, 19), rng.randint(12, 95), rng.randint(2, 14), rng.randint(7, 60)
        total = a * p + b * q
        if total % 20 == 0:
            break
    d = rng.choice([5, 10, 15, 20, 25, 30])
    disc = total * d // 100
    paid = total - disc
    bill = (paid // 100 + 1 + rng.randint(0, 2)) * 100
    change = bill - paid
    problem = (
        f"{name} buys {a} {i1s} at ${p} each and {b} {i2s} at ${q} each. At the register a coupon takes "
        f"{d}% off the whole purchase. {name} pays with ${bill}. How many dollars of change does {name} receive?"
    )
    steps = [
        f"The {i1s} cost {a} \\times {p} = {a * p} dollars.",
        f"The {i2s} cost {b} \\times {q} = {b * q} dollars.",
        f"Before the coupon the total is {a * p} + {b * q} = {total} dollars.",
        f"The coupon saves {d}\\% of {total}, which is {total} \\times {d}/100 = {disc} dollars.",
        f"So {name} pays {total} - {disc} = {paid} dollars.",
        f"The change is {bill} - {paid} = {change} dollars.",
    ]
    checks = [f"{paid} + {change} = {bill}, which matches the bill."]
    return Generated("shopping_change", problem, steps, str(change), checks)


def work_rate(rng: random.Random) -> Generated:
    while True:
        x, y, z = rng.randint(3, 24), rng.randint(3, 24), rng.randint(6, 60)
        net = Fraction(1, x) + Fraction(1, y) - Fraction(1, z)
        if x != y and net > 0:
            break
    t = 1 / net
    problem = (
        f"Pipe A alone fills a tank in {x} hours and pipe B alone fills it in {y} hours. A drain at the bottom "
        f"alone empties the full tank in {z} hours. Starting from an empty tank with both pipes and the drain "
        f"open, how many hours does it take to fill the tank?"
    )
    steps = [
        f"Pipe A fills \\frac{{1}}{{{x}}} of the tank per hour and pipe B fills \\frac{{1}}{{{y}}}.",
        f"The drain removes \\frac{{1}}{{{z}}} of the tank per hour.",
        f"The net rate is \\frac{{1}}{{{x}}} + \\frac{{1}}{{{y}}} - \\frac{{1}}{{{z}}} = {fmt(net)} of the tank per hour.",
        f"The time to fill one tank is 1 \\div {fmt(net)} = {fmt(t)} hours.",
    ]
    checks = [f"{fmt(t)} \\times {fmt(net)} = 1 full tank."]
    return Generated("work_rate", problem, steps, fmt(t), checks)


def two_numbers(rng: random.Random) -> Generated:
    big, small = sorted(rng.sample(range(12, 480), 2), reverse=True)
    s, d = big + small, big - small
    ask = rng.choice(["product", "sum of squares"])
    ans = big * small if ask == "product" else big * big + small * small
    problem = f"Two numbers add up to {s} and differ by {d}. What is the {ask} of the two numbers?"
    steps = [
        f"Call the numbers x and y with x + y = {s} and x - y = {d}.",
        f"Adding the equations gives 2x = {s + d}, so x = {big}.",
        f"Then y = {s} - {big} = {small}.",
        (f"The product is {big} \\times {small} = {ans}." if ask == "product"
         else f"The sum of squares is {big}^2 + {small}^2 = {big * big} + {small * small} = {ans}."),
    ]
    checks = [f"{big} + {small} = {s} and {big} - {small} = {d}."]
    return Generated("two_numbers", problem, steps, str(ans), checks)


def ages(rng: random.Random) -> Generated:
    a_name, b_name = _pick2(rng, NAMES)
    while True:
        b, k, m = rng.randint(3, 30), rng.randint(3, 7), rng.randint(2, 4)
        if m < k and (b * (k - m)) % (m - 1) == 0:
            n = b * (k - m) // (m - 1)
            if 1 <= n <= 60:
                break
    a = k * b
    problem = (
        f"Today {a_name} is {k} times as old as {b_name}. In {n} years, {a_name} will be {m} times as old as "
        f"{b_name}. What is the sum of their ages today?"
    )
    steps = [
        f"Let {b_name}'s age today be b, so {a_name} is {k}b.",
        f"In {n} years: {k}b + {n} = {m}(b + {n}) = {m}b + {m * n}.",
        f"So {k - m}b = {m * n - n}, which gives b = {b}.",
        f"{a_name} is {k} \\times {b} = {a} years old.",
        f"The sum of their ages is {a} + {b} = {a + b}.",
    ]
    checks = [f"In {n} years they are {a + n} and {b + n}, and {m} \\times {b + n} = {m * (b + n)}."]
    return Generated("ages", problem, steps, str(a + b), checks)


def arithmetic_series(rng: random.Random) -> Generated:
    a, d = rng.randint(-40, 90), rng.choice([x for x in range(-9, 14) if x != 0])
    k = rng.randint(5, 30)
    n = k + rng.randint(10, 60)
    ak, an = a + (k - 1) * d, a + (n - 1) * d
    count = n - k + 1
    total = Fraction(count * (ak + an), 2)
    problem = (
        f"An arithmetic sequence starts with {a} and each term is {abs(d)} {'more' if d > 0 else 'less'} than the "
        f"previous one. What is the sum of the {k}th through the {n}th terms, inclusive?"
    )
    steps = [
        f"The common difference is {d}, so the j-th term is {a} + (j - 1)({d}).",
        f"The {k}th term is {a} + {k - 1} \\times ({d}) = {ak}.",
        f"The {n}th term is {a} + {n - 1} \\times ({d}) = {an}.",
        f"There are {n} - {k} + 1 = {count} terms from the {k}th to the {n}th.",
        f"Their sum is {count} \\times ({ak} + {an}) / 2 = {fmt(total)}.",
    ]
    return Generated("arithmetic_series", problem, steps, fmt(total), [f"The average term is {fmt(Fraction(ak + an, 2))}."])


def percent_chain(rng: random.Random) -> Generated:
    price = rng.randint(20, 1500) * 5
    up, down, tax = rng.choice([10, 15, 20, 25, 30, 40]), rng.choice([5, 10, 12, 20, 25]), rng.choice([4, 5, 6, 8])
    p1 = Fraction(price * (100 + up), 100)
    p2 = p1 * Fraction(100 - down, 100)
    p3 = p2 * Fraction(100 + tax, 100)
    item = rng.choice(ITEMS)[0]
    problem = (
        f"A {item} costs ${price}. The shop raises the price by {up}%, then puts it on sale at {down}% off the "
        f"new price, and finally {tax}% sales tax is added to the sale price. What is the final price in dollars?"
    )
    steps = [
        f"After the {up}\\% increase: {price} \\times {fmt(Fraction(100 + up, 100))} = {fmt(p1)}.",
        f"After {down}\\% off: {fmt(p1)} \\times {fmt(Fraction(100 - down, 100))} = {fmt(p2)}.",
        f"After {tax}\\% tax: {fmt(p2)} \\times {fmt(Fraction(100 + tax, 100))} = {fmt(p3)}.",
    ]
    return Generated("percent_chain", problem, steps, fmt(p3), [f"The overall factor is {fmt(p3 / price)}."])


def mod_power(rng: random.Random) -> Generated:
    m = rng.choice([7, 9, 11, 13, 17])
    base = rng.randint(2, 60)
    while math.gcd(base, m) != 1:
        base += 1
    n = rng.randint(50, 2500)
    r = base % m
    powers, x = [], 1
    while True:
        x = (x * r) % m
        powers.append(x)
        if x == 1:
            break
    L = len(powers)
    idx = n % L
    ans = powers[idx - 1] if idx else 1
    shown = ", ".join(f"{r}^{i + 1} \\equiv {v}" for i, v in enumerate(powers[:8]))
    problem = f"What is the remainder when ${base}^{{{n}}}$ is divided by {m}?"
    steps = [
        f"First reduce the base: {base} \\equiv {r} \\pmod{{{m}}}.",
        f"Powers of {r} modulo {m}: {shown}{', ...' if L > 8 else ''}.",
        f"The powers repeat with period {L}, because {r}^{{{L}}} \\equiv 1 \\pmod{{{m}}}.",
        f"{n} = {L} \\times {n // L} + {idx}, so {base}^{{{n}}} \\equiv {r}^{{{idx}}} \\equiv {ans} \\pmod{{{m}}}.",
    ]
    return Generated("mod_power", problem, steps, str(ans), [f"{ans} is between 0 and {m - 1}."])


def linear_fraction_equation(rng: random.Random) -> Generated:
    while True:
        a, b, c, d, e, f = (rng.randint(-12, 15) for _ in range(6))
        if 0 in (a, c, d, f) or f * a - c * d == 0 or c == f:
            continue
        break
    x = Fraction(c * e - f * b, f * a - c * d)

    def lin(p, q):
        coef = {1: "", -1: "-"}.get(p, str(p))
        return f"{coef}x {'+' if q >= 0 else '-'} {abs(q)}"

    problem = f"Solve for $x$: $\\frac{{{lin(a, b)}}}{{{c}}} = \\frac{{{lin(d, e)}}}{{{f}}}$."
    steps = [
        f"Cross-multiply: {f}({lin(a, b)}) = {c}({lin(d, e)}).",
        f"Expand: {lin(f * a, f * b)} = {lin(c * d, c * e)}.",
        f"Collect x terms: ({f * a} - {c * d})x = {c * e} - {f * b}, so {f * a - c * d}x = {c * e - f * b}.",
        f"Divide: x = {fmt(x)}.",
    ]
    checks = [f"Both sides equal {fmt((a * x + b) / c)} at x = {fmt(x)}."]
    return Generated("linear_fraction_equation", problem, steps, fmt(x), checks)


def meeting_time(rng: random.Random) -> Generated:
    n1, n2 = _pick2(rng, NAMES)
    v1, v2 = rng.randint(30, 95), rng.randint(30, 95)
    delay = rng.choice([Fraction(1, 2), Fraction(1), Fraction(3, 2), Fraction(2)])
    dist = rng.randint(int(v1 * delay) + 40, 900)
    head = v1 * delay
    t2 = (dist - head) / (v1 + v2)
    total = delay + t2
    problem = (
        f"{n1} and {n2} live {dist} km apart and drive toward each other. {n1} leaves first at {v1} km/h; "
        f"{n2} leaves {fmt(delay)} {'hour' if delay == 1 else 'hours'} later at {v2} km/h. How many hours after {n1} leaves do they meet?"
    )
    steps = [
        f"In the first {fmt(delay)} hours {n1} covers {v1} \\times {fmt(delay)} = {fmt(head)} km.",
        f"The remaining gap is {dist} - {fmt(head)} = {fmt(dist - head)} km.",
        f"Together they close the gap at {v1} + {v2} = {v1 + v2} km/h.",
        f"That takes {fmt(dist - head)} / {v1 + v2} = {fmt(t2)} hours.",
        f"In total: {fmt(delay)} + {fmt(t2)} = {fmt(total)} hours after {n1} leaves.",
    ]
    return Generated("meeting_time", problem, steps, fmt(total), [f"{v1}({fmt(total)}) + {v2}({fmt(t2)}) = {dist}."])


def mixture(rng: random.Random) -> Generated:
    while True:
        x, y = rng.randint(2, 40), rng.randint(2, 40)
        p, q = rng.sample([10, 15, 20, 25, 30, 40, 45, 50, 60], 2)
        acid = Fraction(x * p + y * q, 100)
        conc = acid / (x + y)
        r = rng.choice([5, 8, 10, 12, 15])
        if Fraction(r, 100) < conc:
            break
    total = acid * 100 / r
    water = total - (x + y)
    problem = (
        f"A chemist mixes {x} liters of a {p}% acid solution with {y} liters of a {q}% acid solution. "
        f"How many liters of pure water must be added so that the mixture is {r}% acid?"
    )
    steps = [
        f"Acid from the first solution: {x} \\times {p}/100 = {fmt(Fraction(x * p, 100))} liters.",
        f"Acid from the second solution: {y} \\times {q}/100 = {fmt(Fraction(y * q, 100))} liters.",
        f"Total acid: {fmt(acid)} liters, which must be {r}\\% of the final volume.",
        f"Final volume: {fmt(acid)} \\times 100/{r} = {fmt(total)} liters.",
        f"Water to add: {fmt(total)} - {x + y} = {fmt(water)} liters.",
    ]
    return Generated("mixture", problem, steps, fmt(water), [f"{fmt(acid)} / {fmt(total)} = {r}/100."])


def vieta(rng: random.Random) -> Generated:
    r1, r2 = rng.randint(-60, 60), rng.randint(-60, 60)
    while r1 == 0 or r2 == 0:
        r1, r2 = rng.randint(-60, 60), rng.randint(-60, 60)
    s, p = r1 + r2, r1 * r2
    ask = rng.choice(["squares", "reciprocals", "cubes"])
    if ask == "squares":
        ans, q = Fraction(s * s - 2 * p), "r^2 + s^2"
        how = f"r^2 + s^2 = (r + s)^2 - 2rs = {s}^2 - 2({p}) = {fmt(ans)}."
    elif ask == "reciprocals":
        ans, q = Fraction(s, p), "\\frac{1}{r} + \\frac{1}{s}"
        how = f"\\frac{{1}}{{r}} + \\frac{{1}}{{s}} = \\frac{{r + s}}{{rs}} = \\frac{{{s}}}{{{p}}} = {fmt(ans)}."
    else:
        ans, q = Fraction(s ** 3 - 3 * p * s), "r^3 + s^3"
        how = f"r^3 + s^3 = (r + s)^3 - 3rs(r + s) = {s}^3 - 3({p})({s}) = {fmt(ans)}."
    bsign = "-" if s >= 0 else "+"
    csign = "+" if p >= 0 else "-"
    problem = f"Let $r$ and $s$ be the roots of $x^2 {bsign} {abs(s)}x {csign} {abs(p)} = 0$. Compute ${q}$."
    steps = [
        f"By Vieta's formulas, r + s = {s} and rs = {p}.",
        how,
    ]
    return Generated("vieta", problem, steps, fmt(ans), [f"The roots are {r1} and {r2}."])


def bells_lcm(rng: random.Random) -> Generated:
    a, b, c = sorted(rng.sample(range(4, 45), 3))
    l_ab = a * b // math.gcd(a, b)
    l = l_ab * c // math.gcd(l_ab, c)
    hours = rng.randint(max(1, l // 60 + 1), max(2, l // 60 + 1) + 30)
    times = hours * 60 // l + 1
    problem = (
        f"Three bells ring every {a}, {b} and {c} minutes. They all ring together at noon. Counting the ring "
        f"at noon, how many times do all three ring together in the {hours} hours starting at noon (up to and "
        f"including the end of that period)?"
    )
    steps = [
        f"They ring together every lcm({a}, {b}, {c}) minutes.",
        f"lcm({a}, {b}) = {l_ab} and lcm({l_ab}, {c}) = {l}.",
        f"The period lasts {hours} \\times 60 = {hours * 60} minutes.",
        f"Joint rings after noon: \\lfloor {hours * 60} / {l} \\rfloor = {hours * 60 // l}.",
        f"Including noon: {hours * 60 // l} + 1 = {times}.",
    ]
    return Generated("bells_lcm", problem, steps, str(times), [f"{l} is divisible by {a}, {b} and {c}."])


def order_of_ops(rng: random.Random) -> Generated:
    while True:
        a, b, c, d, e, f = (rng.randint(3, 99) for _ in range(6))
        d = rng.randint(2, 12)
        if (a * b - c) % d == 0 and a * b - c > 0:
            break
    q = (a * b - c) // d
    ans = q + e * e - f
    problem = f"Evaluate $({a} \\times {b} - {c}) \\div {d} + {e}^2 - {f}$."
    steps = [
        f"Inside the parentheses: {a} \\times {b} = {a * b}, then {a * b} - {c} = {a * b - c}.",
        f"Divide: {a * b - c} \\div {d} = {q}.",
        f"Square: {e}^2 = {e * e}.",
        f"Combine: {q} + {e * e} - {f} = {ans}.",
    ]
    return Generated("order_of_ops", problem, steps, str(ans), [f"{q} \\times {d} = {a * b - c}."])


TEMPLATES: dict[str, Callable[[random.Random], Generated]] = {
    f.__name__: f
    for f in [shopping_change, work_rate, two_numbers, ages, arithmetic_series, percent_chain, mod_power,
              linear_fraction_equation, meeting_time, mixture, vieta, bells_lcm, order_of_ops]
}

_OPENERS = ["Let me work through this carefully.", "Okay, let me set this up.", "Let me think about what is asked.",
            "I need to be careful with the arithmetic here."]
_ACKS = ["OK.", "Good.", "That makes sense.", "Fine so far.", "That looks right."]


def solution_text(g: Generated) -> str:
    return "\n".join(g.steps) + f"\nTherefore, the final answer is $\\boxed{{{g.answer}}}$."


def final_text(g: Generated) -> str:
    # The trace already holds every step: repeating the solution after </think> would add ~110 tokens and push
    # most completions past a GRPO generation budget of a few hundred tokens before their \boxed{} answer.
    return f"The final answer is $\\boxed{{{g.answer}}}$."


def trace_text(g: Generated, rng: random.Random) -> str:
    """A thinking-style trace: restate, compute with acknowledgements, double-check, conclude (no box)."""
    lines = [rng.choice(_OPENERS), f"The question: {g.problem}"]
    for i, s in enumerate(g.steps):
        lines.append(s if rng.random() < 0.6 else f"{s} {rng.choice(_ACKS)}")
        if i == len(g.steps) // 2 and len(g.steps) > 2:
            lines.append("Let me re-read the question to make sure I am computing the right quantity. Yes.")
    for c in g.checks:
        lines.append(f"Let me double-check: {c}")
    lines.append(f"So the answer is {g.answer}.")
    return "\n".join(lines)


def generate(n: int, seed: int, templates: list[str] | None = None) -> Iterator[dict]:
    """n rows: id, problem, solution (boxed), trace, final (one boxed sentence after the trace), answer, template."""
    names = templates or list(TEMPLATES)
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown synthetic templates {unknown}; known: {sorted(TEMPLATES)}")
    rng = random.Random(seed)
    for i in range(n):
        g = TEMPLATES[names[i % len(names)]](rng)
        yield {
            "id": f"{i:07d}",
            "problem": g.problem,
            "solution": solution_text(g),
            "trace": trace_text(g, rng),
            "final": final_text(g),
            "answer": g.answer,
            "template": g.template,
        }
