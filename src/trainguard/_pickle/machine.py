"""A symbolic pickle machine.

It follows the unpickler's stack, mark stack and memo exactly, opcode by opcode, but where
an unpickler would import or call something it records an `Event` instead. Nothing from the
artifact is ever imported or called. A stream the real unpickler would reject stops the
machine at the same opcode, with everything before it already recorded: code in a "broken"
pickle runs before the error, so it must be seen before the error.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from trainguard._pickle.opcodes import OPCODES, Arg
from trainguard._pickle.reader import ARG_KIND, FIXED_BY_CODE, Buffer, LimitError, PickleSyntaxError, read_op
from trainguard._pickle.values import Call, Dct, Global, Opaque, PersRef, Seq, Value, describe


@dataclasses.dataclass(frozen=True)
class PickleLimits:
    """Bounds that keep a hostile pickle from exhausting time or memory."""

    # Opcodes for all the pickles of one file together (see Machine's `ops_spent`): the scan's work
    # is bounded per file however the file is built. A state dict costs about 30 per tensor, so this
    # covers 600,000 tensors; the scanner runs 1-3 million opcodes a second.
    max_ops: int = 20_000_000
    # Each symbolic value costs ~150 bytes; these bounds keep a hostile pickle near 300 MiB at
    # worst while leaving room for the largest real state dicts (a few hundred thousand tensors).
    max_memo: int = 2_000_000
    max_stack: int = 1_000_000
    max_marks: int = 100_000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive")


class Event(NamedTuple):
    """Something the unpickler would have done that can run code or change global state.

    kind is one of: import, call, unresolved-import, non-constant-call, global-attribute-write,
    global-mutation, container-misuse, extension.
    """

    kind: str
    pos: int
    module: str = ""
    name: str = ""
    detail: str = ""
    written_as: str = ""  # the name in the stream, when the Python 2 compatibility map renamed it

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


@dataclasses.dataclass
class MachineResult:
    start: int
    end: int  # position after STOP, or where the error was found
    value: Value
    events: list[Event]
    persistent_ids: list[PersRef]
    ops: int
    error: PickleSyntaxError | None
    protocol: int


BuildHook = Callable[["Machine", Call, Value], None]


class Machine:
    """Runs one pickle (up to its STOP) symbolically."""

    def __init__(
        self,
        data: Buffer,
        start: int = 0,
        end: int | None = None,
        *,
        limits: PickleLimits | None = None,
        build_hook: BuildHook | None = None,
        ops_spent: int = 0,
    ) -> None:
        """`ops_spent`: opcodes already run by earlier readings of the same file, which share
        `limits.max_ops` with this one, so a file's work is bounded however many streams it holds."""
        self.data = data
        self.start = start
        self.pos = start
        self.end = len(data) if end is None else end
        self.limits = limits or PickleLimits()
        self.build_hook = build_hook
        # One flat stack and the positions of its MARKs, as CPython's C unpickler keeps them:
        # items below `fence` belong to outer marks and cannot be popped.
        self.stack: list[Value] = []
        self.marks: list[int] = []
        self.fence = 0
        self.memo: dict[int, Value] = {}
        self.proto = 0
        # Where the last FRAME's bytes end: joblib reads an array from there (see the scan's joblib hook).
        self.frame_end: int | None = None
        self.events: list[Event] = []
        self.persistent_ids: list[PersRef] = []
        self._ops_spent = ops_spent
        self.ops = ops_spent

    # -- stack helpers, raising exactly where the unpickler raises
    def _pop(self, op_pos: int) -> Value:
        if len(self.stack) <= self.fence:
            raise PickleSyntaxError("unpickling stack underflow", op_pos)
        return self.stack.pop()

    def _top(self, op_pos: int) -> Value:
        if len(self.stack) <= self.fence:
            raise PickleSyntaxError("unpickling stack underflow", op_pos)
        return self.stack[-1]

    def _pop_mark(self, op_pos: int) -> list[Value]:
        if not self.marks:
            raise PickleSyntaxError("could not find MARK", op_pos)
        start = self.marks.pop()
        self.fence = self.marks[-1] if self.marks else 0
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def _push(self, value: Value) -> None:
        self.stack.append(value)

    def _event(self, kind: str, pos: int, **fields: str) -> None:
        self.events.append(Event(kind, pos, **fields))

    # -- imports and calls
    def _find_class(self, module: str, name: str, pos: int, how: str) -> Global:
        written = f"{module}.{name}"
        # Pickles below protocol 3 are read with the Python 2 name map, as pickle.load does by default.
        if self.proto < 3:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        renamed = written if f"{module}.{name}" != written else ""
        self._event("import", pos, module=module, name=name, detail=how, written_as=renamed)
        return Global(module, name, pos)

    def _call(self, func: Value, args: Value, pos: int, op: str, kwargs: Value = None) -> Call:
        if isinstance(func, Global):
            self._event("call", pos, module=func.module, name=func.name, detail=op)
        elif isinstance(func, (Call, PersRef, Opaque)):
            self._event("non-constant-call", pos, detail=f"{op} calls {describe(func)}")
        return Call(func, args, pos, op, kwargs)

    def _mutate(self, target: Value, pos: int, op: str, fits: tuple[str, ...]) -> None:
        """Record container opcodes applied to an import, or to a value no pickler applies them to."""
        if isinstance(target, Global):
            self._event(
                "global-mutation", pos, module=target.module, name=target.name, detail=f"{op} on an import"
            )
        elif isinstance(target, (Call, PersRef, Opaque)):
            return  # an object built by an allowed call may implement the protocol itself
        elif not (isinstance(target, Seq) and target.kind in fits) and not (
            isinstance(target, Dct) and "dict" in fits
        ):
            # Loaders have corrupted memory on such streams (CVE-2026-24747); no pickler writes them.
            self._event("container-misuse", pos, detail=f"{op} applied to {describe(target)}")

    # -- the run loop
    def run(self) -> MachineResult:
        error: PickleSyntaxError | None = None
        value: Value = None
        try:
            value = self._loop()
        except PickleSyntaxError as exc:
            error = exc
        return MachineResult(
            start=self.start,
            end=self.pos,
            value=value,
            events=self.events,
            persistent_ids=self.persistent_ids,
            ops=self.ops - self._ops_spent,
            error=error,
            protocol=self.proto,
        )

    def _loop(self) -> Value:
        # The hot path: locals instead of attributes, tables indexed by opcode byte, and the commonest
        # opcodes of real checkpoints decoded and applied inline; edge cases go to read_op and the handlers.
        data, end = self.data, self.end
        dispatch, no_arg, fixed_by_code = _DISPATCH, _NO_ARG, FIXED_BY_CODE
        limits = self.limits
        max_ops, max_stack, max_memo = limits.max_ops, limits.max_stack, limits.max_memo
        max_marks = limits.max_marks
        stack, memo, marks, events = self.stack, self.memo, self.marks, self.events
        pos, ops = self.pos, self.ops
        try:
            while True:
                op_pos = pos
                code = data[pos] if pos < end else -1
                if _ONE_BYTE_ARG[code] and pos + 1 < end:  # BINPUT, BINGET, BININT1
                    arg: object = data[pos + 1]
                    pos += 2
                elif code >= 0 and no_arg[code]:
                    arg = None
                    pos += 1
                elif code >= 0 and (fixed := fixed_by_code[code]) is not None and pos + fixed[0] < end:
                    arg = fixed[1](data, pos + 1)[0]  # BININT, BININT2, BINFLOAT, LONG_BINGET/PUT...
                    pos += 1 + fixed[0]
                elif code == 0x8C and pos + 1 < end and data[pos + 1] <= end - pos - 2:  # SHORT_BINUNICODE
                    n = data[pos + 1]
                    try:
                        arg = data[pos + 2 : pos + 2 + n].decode("utf-8", "surrogatepass")
                        pos += 2 + n
                    except UnicodeDecodeError:
                        code, arg, pos = read_op(data, pos, end)  # which reports it
                else:
                    code, arg, pos = read_op(data, pos, end)
                ops += 1
                if ops > max_ops:
                    raise LimitError(f"more than {max_ops} opcodes in one file", op_pos)
                if code == 0x71:  # BINPUT
                    if len(stack) > self.fence and len(memo) < max_memo:
                        memo[arg] = stack[-1]  # type: ignore[index]
                        continue
                elif code == 0x94:  # MEMOIZE
                    if len(stack) > self.fence and len(memo) < max_memo:
                        memo[len(memo)] = stack[-1]
                        continue
                elif code == 0x68:  # BINGET
                    if arg in memo and len(stack) < max_stack:
                        stack.append(memo[arg])
                        continue
                elif code == 0x28:  # MARK
                    if len(marks) < max_marks:
                        self.fence = len(stack)
                        marks.append(self.fence)
                        continue
                elif code == 0x29:  # EMPTY_TUPLE
                    if len(stack) < max_stack:
                        stack.append(Seq("tuple", []))
                        continue
                elif code in (0x88, 0x89):  # NEWTRUE, NEWFALSE
                    if len(stack) < max_stack:
                        stack.append(code == 0x88)
                        continue
                elif 0x85 <= code <= 0x87:  # TUPLE1, TUPLE2, TUPLE3
                    n = code - 0x84
                    if len(stack) - self.fence >= n:
                        items = stack[-n:]
                        del stack[-n:]
                        stack.append(Seq("tuple", items))
                        continue
                elif code == 0x74:  # TUPLE
                    if marks:
                        start = marks.pop()
                        self.fence = marks[-1] if marks else 0
                        items = stack[start:]
                        del stack[start:]
                        stack.append(Seq("tuple", items))
                        continue
                elif code == 0x52:  # REDUCE of a plain import, as every torch tensor is rebuilt
                    if len(stack) - self.fence >= 2:
                        func = stack[-2]
                        if type(func) is Global:
                            args = stack.pop()
                            events.append(Event("call", op_pos, func.module, func.name, "REDUCE"))
                            stack[-1] = Call(func, args, op_pos, "REDUCE")
                            continue
                elif code == 0x7D:  # EMPTY_DICT
                    if len(stack) < max_stack:
                        stack.append(Dct([]))
                        continue
                elif code == 0x2E:  # STOP
                    return self._pop(op_pos)
                handler = dispatch[code]
                if handler is None:  # an opcode that pushes its argument
                    stack.append(arg)  # type: ignore[arg-type]
                else:
                    self.pos = pos
                    handler(self, arg, op_pos)
                    pos = self.pos
                if len(stack) > max_stack:
                    raise LimitError(f"more than {max_stack} stack items", op_pos)
        finally:
            self.pos, self.ops = pos, ops

    # -- opcode handlers
    def op_mark(self, arg: object, pos: int) -> None:
        if len(self.marks) >= self.limits.max_marks:
            raise LimitError(f"more than {self.limits.max_marks} nested MARKs", pos)
        self.fence = len(self.stack)
        self.marks.append(self.fence)

    def op_pop(self, arg: object, pos: int) -> None:
        if len(self.stack) > self.fence:
            self.stack.pop()
        else:
            self._pop_mark(pos)  # an empty frame: POP discards its MARK, as CPython does

    def op_pop_mark(self, arg: object, pos: int) -> None:
        self._pop_mark(pos)

    def op_dup(self, arg: object, pos: int) -> None:
        self._push(self._top(pos))

    def op_proto(self, arg: object, pos: int) -> None:
        assert isinstance(arg, int)
        self.proto = arg

    def op_frame(self, arg: object, pos: int) -> None:
        # A frame longer than what remains is read as far as it goes: pickle's pure-Python unpickler
        # (joblib's) accepts it, where the C one stops; the opcodes in it are read either way.
        assert isinstance(arg, int)
        self.frame_end = min(self.pos + arg, self.end)

    def op_persid(self, arg: object, pos: int) -> None:
        assert isinstance(arg, str)
        ref = PersRef(arg, pos)
        self.persistent_ids.append(ref)
        self._push(ref)

    def op_binpersid(self, arg: object, pos: int) -> None:
        ref = PersRef(self._pop(pos), pos)
        self.persistent_ids.append(ref)
        self._push(ref)

    def op_reduce(self, arg: object, pos: int) -> None:
        args = self._pop(pos)
        func = self._pop(pos)
        self._push(self._call(func, args, pos, "REDUCE"))

    def op_newobj(self, arg: object, pos: int) -> None:
        args = self._pop(pos)
        cls = self._pop(pos)
        self._push(self._call(cls, args, pos, "NEWOBJ"))

    def op_newobj_ex(self, arg: object, pos: int) -> None:
        kwargs = self._pop(pos)
        args = self._pop(pos)
        cls = self._pop(pos)
        self._push(self._call(cls, args, pos, "NEWOBJ_EX", kwargs))

    def op_global(self, arg: object, pos: int) -> None:
        assert isinstance(arg, tuple)
        self._push(self._find_class(arg[0], arg[1], pos, "GLOBAL"))

    def op_stack_global(self, arg: object, pos: int) -> None:
        name = self._pop(pos)
        module = self._pop(pos)
        if isinstance(module, str) and isinstance(name, str):
            self._push(self._find_class(module, name, pos, "STACK_GLOBAL"))
            return
        # The unpickler accepts only str here; anything we cannot pin down is a finding.
        self._event(
            "unresolved-import", pos, detail=f"STACK_GLOBAL of {describe(module)} and {describe(name)}"
        )
        self._push(Opaque("an unresolved import"))

    def op_inst(self, arg: object, pos: int) -> None:
        assert isinstance(arg, tuple)
        cls = self._find_class(arg[0], arg[1], pos, "INST")
        args = self._pop_mark(pos)
        self._push(self._call(cls, Seq("tuple", args), pos, "INST"))

    def op_obj(self, arg: object, pos: int) -> None:
        items = self._pop_mark(pos)
        if not items:
            raise PickleSyntaxError("OBJ without a class", pos)
        cls = items.pop(0)
        self._push(self._call(cls, Seq("tuple", items), pos, "OBJ"))

    def op_ext(self, arg: object, pos: int) -> None:
        assert isinstance(arg, int)
        # The extension registry lives in the loading process; what a code means cannot be known here.
        self._event("extension", pos, detail=f"extension code {arg}")
        self._push(Opaque(f"extension code {arg}"))

    def op_build(self, arg: object, pos: int) -> None:
        state = self._pop(pos)
        target = self._top(pos)
        if isinstance(target, Global):
            self._event(
                "global-attribute-write",
                pos,
                module=target.module,
                name=target.name,
                detail="BUILD sets attributes on an imported object",
            )
        elif isinstance(target, Call):
            if len(target.states) < 8:
                target.states.append(state)
            if self.build_hook is not None:
                self.build_hook(self, target, state)

    def op_append(self, arg: object, pos: int) -> None:
        value = self._pop(pos)
        target = self._top(pos)
        self._mutate(target, pos, "APPEND", ("list",))
        if isinstance(target, Seq):
            target.extend([value])

    def op_appends(self, arg: object, pos: int) -> None:
        items = self._pop_mark(pos)
        target = self._top(pos)
        self._mutate(target, pos, "APPENDS", ("list",))
        if isinstance(target, Seq):
            target.extend(items)

    def op_additems(self, arg: object, pos: int) -> None:
        items = self._pop_mark(pos)
        target = self._top(pos)
        self._mutate(target, pos, "ADDITEMS", ("set",))
        if isinstance(target, Seq):
            target.extend(items)

    def op_setitem(self, arg: object, pos: int) -> None:
        value = self._pop(pos)
        key = self._pop(pos)
        target = self._top(pos)
        self._mutate(target, pos, "SETITEM", ("dict",))
        if isinstance(target, Dct):
            target.extend([(key, value)])

    def op_setitems(self, arg: object, pos: int) -> None:
        items = self._pop_mark(pos)
        if len(items) % 2:
            raise PickleSyntaxError("odd number of items for SETITEMS", pos)
        target = self._top(pos)
        self._mutate(target, pos, "SETITEMS", ("dict",))
        if isinstance(target, Dct):
            target.extend(list(zip(items[::2], items[1::2], strict=True)))

    def op_dict(self, arg: object, pos: int) -> None:
        items = self._pop_mark(pos)
        if len(items) % 2:
            raise PickleSyntaxError("odd number of items for DICT", pos)
        self._push(Dct(list(zip(items[::2], items[1::2], strict=True))))

    def op_empty_dict(self, arg: object, pos: int) -> None:
        self._push(Dct([]))

    def op_list(self, arg: object, pos: int) -> None:
        self._push(Seq("list", self._pop_mark(pos)))

    def op_empty_list(self, arg: object, pos: int) -> None:
        self._push(Seq("list", []))

    def op_tuple(self, arg: object, pos: int) -> None:
        self._push(Seq("tuple", self._pop_mark(pos)))

    def op_empty_tuple(self, arg: object, pos: int) -> None:
        self._push(Seq("tuple", []))

    def op_tuple_n(self, n: int, pos: int) -> None:
        if len(self.stack) - self.fence < n:
            raise PickleSyntaxError("unpickling stack underflow", pos)
        items = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        self._push(Seq("tuple", items))

    def op_empty_set(self, arg: object, pos: int) -> None:
        self._push(Seq("set", []))

    def op_frozenset(self, arg: object, pos: int) -> None:
        self._push(Seq("frozenset", self._pop_mark(pos)))

    def op_put(self, arg: object, pos: int) -> None:
        assert isinstance(arg, int)
        if arg < 0:
            raise PickleSyntaxError("negative PUT argument", pos)
        self._memoize(arg, pos)

    def op_memoize(self, arg: object, pos: int) -> None:
        self._memoize(len(self.memo), pos)

    def _memoize(self, index: int, pos: int) -> None:
        value = self._top(pos)
        if index not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise LimitError(f"more than {self.limits.max_memo} memo entries", pos)
        self.memo[index] = value

    def op_get(self, arg: object, pos: int) -> None:
        assert isinstance(arg, int)
        try:
            self._push(self.memo[arg])
        except KeyError:
            raise PickleSyntaxError(f"memo value not found at index {arg}", pos) from None

    def op_next_buffer(self, arg: object, pos: int) -> None:
        self._push(Opaque("an out-of-band buffer"))

    def op_readonly_buffer(self, arg: object, pos: int) -> None:
        self._top(pos)


_HANDLERS: dict[str, Callable[[Machine, object, int], None]] = {
    "MARK": Machine.op_mark,
    "POP": Machine.op_pop,
    "POP_MARK": Machine.op_pop_mark,
    "DUP": Machine.op_dup,
    "PROTO": Machine.op_proto,
    "FRAME": Machine.op_frame,
    "PERSID": Machine.op_persid,
    "BINPERSID": Machine.op_binpersid,
    "REDUCE": Machine.op_reduce,
    "NEWOBJ": Machine.op_newobj,
    "NEWOBJ_EX": Machine.op_newobj_ex,
    "GLOBAL": Machine.op_global,
    "STACK_GLOBAL": Machine.op_stack_global,
    "INST": Machine.op_inst,
    "OBJ": Machine.op_obj,
    "EXT1": Machine.op_ext,
    "EXT2": Machine.op_ext,
    "EXT4": Machine.op_ext,
    "BUILD": Machine.op_build,
    "APPEND": Machine.op_append,
    "APPENDS": Machine.op_appends,
    "ADDITEMS": Machine.op_additems,
    "SETITEM": Machine.op_setitem,
    "SETITEMS": Machine.op_setitems,
    "DICT": Machine.op_dict,
    "EMPTY_DICT": Machine.op_empty_dict,
    "LIST": Machine.op_list,
    "EMPTY_LIST": Machine.op_empty_list,
    "TUPLE": Machine.op_tuple,
    "EMPTY_TUPLE": Machine.op_empty_tuple,
    "TUPLE1": lambda m, a, p: m.op_tuple_n(1, p),
    "TUPLE2": lambda m, a, p: m.op_tuple_n(2, p),
    "TUPLE3": lambda m, a, p: m.op_tuple_n(3, p),
    "EMPTY_SET": Machine.op_empty_set,
    "FROZENSET": Machine.op_frozenset,
    "PUT": Machine.op_put,
    "BINPUT": Machine.op_put,
    "LONG_BINPUT": Machine.op_put,
    "MEMOIZE": Machine.op_memoize,
    "GET": Machine.op_get,
    "BINGET": Machine.op_get,
    "LONG_BINGET": Machine.op_get,
    "NEXT_BUFFER": Machine.op_next_buffer,
    "READONLY_BUFFER": Machine.op_readonly_buffer,
    "NEWTRUE": lambda m, a, p: m._push(True),
    "NEWFALSE": lambda m, a, p: m._push(False),
    "BYTEARRAY8": lambda m, a, p: m._push(Opaque("a bytearray")),
}


def _build_dispatch() -> list[Callable[[Machine, object, int], None] | None]:
    """Handlers by opcode byte; None for opcodes that push their argument (NONE pushes None)."""
    by_name = {name: code for code, (name, _) in OPCODES.items()}
    table: list[Callable[[Machine, object, int], None] | None] = [None] * 256
    for name, handler in _HANDLERS.items():
        table[by_name[name]] = handler
    return table


_DISPATCH = _build_dispatch()
_NO_ARG = bytes(1 if kind is Arg.NONE else 0 for kind in ARG_KIND)
# Indexed by opcode byte, and by -1 (past the end) through the last slot, which is 0.
_ONE_BYTE_ARG = bytes(1 if code in (0x71, 0x68, 0x4B) else 0 for code in range(256))
