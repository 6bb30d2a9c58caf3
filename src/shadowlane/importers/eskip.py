"""A small parser for Skipper's eskip route text: `id: Pred() && Pred() -> filter() -> backend;`.

Only what route files hold: route ids, predicates joined by `&&` (or `*`), filters joined by
`->`, and a backend (a quoted URL, `<shunt>`, `<loopback>`, `<dynamic>`, or a load-balanced
`<algorithm, "url", ...>`); arguments are numbers, "strings", `strings` and /regexps/; `//`
starts a comment. RouteGroups hold single predicates and filters as strings, which
`parse_call` reads with the same tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Arg = str | float


class EskipError(ValueError):
    """Text that is not eskip; the message names the line and column."""


@dataclass(frozen=True)
class Call:
    """A predicate or filter: `Name(arg, ...)`."""

    name: str
    args: tuple[Arg, ...] = ()

    def __str__(self) -> str:
        shown = ", ".join(repr(a) if isinstance(a, str) else f"{a:g}" for a in self.args)
        return f"{self.name}({shown})"


@dataclass
class EskipRoute:
    id: str
    predicates: list[Call] = field(default_factory=list)
    filters: list[Call] = field(default_factory=list)
    #: ("network", url) | ("lb", algorithm, url, ...) | ("shunt",) | ("loopback",) | ("dynamic",)
    backend: tuple[str, ...] = ("shunt",)


_SYMBOLS = ("&&", "->", ":", "(", ")", ",", ";", "*", "<", ">")


@dataclass(frozen=True)
class _Tok:
    kind: str  # ident, number, string, regex, sym, end
    value: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c in '"`/':
            end = c
            j = i + 1
            buf: list[str] = []
            while j < n and text[j] != end:
                if text[j] == "\\" and j + 1 < n and end != "`":
                    nxt = text[j + 1]
                    if end == "/":
                        # a regex keeps its escapes, except the escaped delimiter
                        buf.append(nxt if nxt == "/" else "\\" + nxt)
                    else:
                        buf.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            if j >= n:
                raise EskipError(f"{_where(text, i)}: unterminated {c}...{c}")
            out.append(_Tok("regex" if c == "/" else "string", "".join(buf), i))
            i = j + 1
        elif c.isdigit() or (c in "-." and i + 1 < n and text[i + 1].isdigit()):
            j = i + 1
            while j < n and (text[j].isdigit() or text[j] in ".eE"):
                j += 1
            out.append(_Tok("number", text[i:j], i))
            i = j
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "_-"):
                j += 1
            out.append(_Tok("ident", text[i:j], i))
            i = j
        else:
            for sym in _SYMBOLS:
                if text.startswith(sym, i):
                    out.append(_Tok("sym", sym, i))
                    i += len(sym)
                    break
            else:
                raise EskipError(f"{_where(text, i)}: unexpected {c!r}")
    out.append(_Tok("end", "", n))
    return out


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"{line}:{col}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def fail(self, what: str) -> EskipError:
        tok = self.tok
        got = "end of text" if tok.kind == "end" else repr(tok.value)
        return EskipError(f"{_where(self.text, tok.pos)}: expected {what}, got {got}")

    def take(self, kind: str, value: str | None = None) -> _Tok:
        tok = self.tok
        if tok.kind != kind or (value is not None and tok.value != value):
            raise self.fail(repr(value) if value else kind)
        self.i += 1
        return tok

    def at(self, kind: str, value: str | None = None) -> bool:
        tok = self.tok
        return tok.kind == kind and (value is None or tok.value == value)

    def call(self) -> Call:
        name = self.take("ident").value
        self.take("sym", "(")
        args: list[Arg] = []
        while not self.at("sym", ")"):
            tok = self.tok
            if tok.kind == "number":
                args.append(float(tok.value))
            elif tok.kind in ("string", "regex"):
                args.append(tok.value)
            else:
                raise self.fail("an argument")
            self.i += 1
            if not self.at("sym", ")"):
                self.take("sym", ",")
        self.take("sym", ")")
        return Call(name, tuple(args))

    def backend(self) -> tuple[str, ...]:
        if self.at("string"):
            return ("network", self.take("string").value)
        if not self.at("sym", "<"):
            raise self.fail('a backend ("url" or <...>)')
        self.take("sym", "<")
        if self.at("ident"):
            word = self.take("ident").value
            if word in ("shunt", "loopback", "dynamic") and self.at("sym", ">"):
                self.take("sym", ">")
                return (word,)
            urls: list[str] = []
        else:
            word = "roundRobin"
            urls = [self.take("string").value]
        while self.at("sym", ","):
            self.take("sym", ",")
            urls.append(self.take("string").value)
        self.take("sym", ">")
        return ("lb", word, *urls)

    def route(self) -> EskipRoute:
        rid = self.take("ident").value
        self.take("sym", ":")
        route = EskipRoute(rid)
        if self.at("sym", "*"):
            self.take("sym", "*")
        else:
            route.predicates.append(self.call())
            while self.at("sym", "&&"):
                self.take("sym", "&&")
                route.predicates.append(self.call())
        self.take("sym", "->")
        while self.at("ident"):
            route.filters.append(self.call())
            self.take("sym", "->")
        route.backend = self.backend()
        return route

    def routes(self) -> list[EskipRoute]:
        out: list[EskipRoute] = []
        while not self.at("end"):
            out.append(self.route())
            if self.at("sym", ";"):
                self.take("sym", ";")
            elif not self.at("end"):
                raise self.fail("';'")
        return out


def parse_routes(text: str) -> list[EskipRoute]:
    """Every route in an eskip text, in order."""
    return _Parser(text).routes()


def parse_call(text: str) -> Call:
    """One predicate or filter as a RouteGroup writes it: `Tee("intake_shadow")`."""
    parser = _Parser(text)
    call = parser.call()
    if not parser.at("end"):
        raise parser.fail("end of text")
    return call
