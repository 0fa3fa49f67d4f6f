"""The incident's attacks, as a drill plays them: each planted from outside the guarded code, the way an
insider with a normal account would, and each judged by the evidence it left.

An attack prepares its run (edits the copy of the job's code, writes a checkpoint on the load path,
starts a process that sends a signal, edits a ledger) and says what would prove it caught: an alert
naming the rank, a refused load naming the file, a signal with its sender, a verification that fails.
Payloads are harmless: the planted pickle only prints a marker, and the drill checks that it never did.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ATTACK_STEP", "GROUPS", "MIN_STEPS", "SAVE_EVERY", "Attack", "build", "select"]

GROUPS = {
    "a": "code planted in checkpoints",
    "b": "the optimizer patched at run time",
    "c": "the shared PyTorch install edited",
    "d": "processes killed",
    "e": "weights altered, checkpoints deleted",
    "f": "the evidence erased",
}

MARKER = "TRAINGUARD-DRILL-PAYLOAD-RAN"
ATTACK_STEP = 6
# The job saves a checkpoint every 5 steps; the checkpoint attacks need two of them, and the attacks
# inside the job act at ATTACK_STEP and need steps after it to be seen.
SAVE_EVERY = 5
MIN_STEPS = 2 * SAVE_EVERY


@dataclasses.dataclass(frozen=True)
class Attack:
    """One attack: `name`, its incident `group` (a-f), what it does, and how the drill plays it:
    `kind` is "train" (a run of the job with the attack planted), "signal" (a run that another process
    signals), "environment" (a run of the job on a tampered copy of its Python environment) or
    "offline" (an edit of what a finished run left, then the check that must see it)."""

    name: str
    group: str
    what: str
    kind: str
    # What the job's code gets appended to its data module (a patch armed from outside the guard).
    job_patch: str = ""
    # What a user's script gets planted instead (imported in its ranks), where the job_patch needs the
    # built-in job's own code; "" when the job_patch serves both.
    script_patch: str = ""
    # The checkpoint the job resumes from: "payload", "payload-signed", "altered" or "".
    resume: str = ""
    expected_ranks: tuple[int, ...] = ()


# Planted in each patch below: notes, for the drill, that the patch acted (only in a script's run, where
# the drill names the file in TRAINGUARD_DRILL_ACTED).
_ACTED = """\
    def acted():
        note = os.environ.get("TRAINGUARD_DRILL_ACTED")
        if note and not os.path.exists(note):
            open(note, "a").close()
"""

_FLIP = """

# Planted: patches AdamW's update on one rank, only in a job of the drill's size or more.
def _plant() -> None:
    import os

    import torch.optim.adam as adam

    if int(os.environ.get("WORLD_SIZE", "1")) < {world} or os.environ.get("RANK") not in {ranks!r}:
        return

{acted}
    original, calls = adam._single_tensor_adam, [0]

    def patched(params, *args, **kwargs):
        calls[0] += 1
        before = [p.detach().clone() for p in params]
        original(params, *args, **kwargs)
        if calls[0] >= {step}:
            import torch

            acted()
            with torch.no_grad():
                for p, old in zip(params, before):
                    p.copy_(2 * old - p)  # the update, reversed: the loss climbs

    adam._single_tensor_adam = patched


_plant()
"""

_SLEEP = """

# Planted: random sleeps in the optimizer step on one rank, from a step on.
def _plant() -> None:
    import os
    import random
    import time

    import torch.optim.adam as adam

    if os.environ.get("RANK") not in {ranks!r}:
        return

{acted}
    original, calls = adam._single_tensor_adam, [0]

    def patched(params, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= {step}:
            acted()
        if calls[0] >= {step} and (calls[0] == {step} or random.random() < 0.5):
            time.sleep(0.3)
        original(params, *args, **kwargs)

    adam._single_tensor_adam = patched


_plant()
"""

_HOOK = """

# Planted: on one rank, a forward hook that scales a layer's output from a step on, added as DDP wraps
# the model.
def _plant() -> None:
    import os

    import torch

    if os.environ.get("RANK") not in {ranks!r}:
        return

{acted}
    ddp = torch.nn.parallel.DistributedDataParallel
    original = ddp.__init__

    def init(self, module, *args, **kwargs):
        original(self, module, *args, **kwargs)
        calls = [0]

        def scale(layer, inputs, output):
            calls[0] += 1
            if calls[0] < {step}:
                return output
            acted()
            return output * 1.5

        # A Linear that runs as a module (attention reads its out_proj's weight directly).
        layers = [m for n, m in module.named_modules() if type(m) is torch.nn.Linear]
        layers[0].register_forward_hook(scale)

    ddp.__init__ = init


_plant()
"""


# Attacks that change no code at all: the job's own data module, which the insider can edit, reaches
# the optimizer through its caller's frame (the training loop's locals) and changes what it holds.
_DATA_ONLY = """

_original_get = Batches.get


def _get(self, step):
    import os
    import sys

    import torch

    optimizer = sys._getframe(1).f_locals.get("optimizer")
    if os.environ.get("RANK") in {ranks!r} and step >= {step} and optimizer is not None:
        with torch.no_grad():
{action}
    return _original_get(self, step)


Batches.get = _get
"""

_NUDGE_WEIGHTS = """\
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.add_(torch.randn_like(p) * 1e-3)  # weights written between steps"""

_NEGATE_LR = """\
            if step == {step}:
                for group in optimizer.param_groups:
                    group["lr"] = -group["lr"]  # the same rule, walking up the loss"""

_FLIP_STATE = """\
            if step == {step}:
                for state in optimizer.state.values():
                    if "exp_avg" in state:
                        state["exp_avg"].neg_()  # the momentum reversed"""


# Attacks that reach the training loop's locals (the model, the optimizer, the guard) from the job's
# data module, through its caller's frame, and act once on one rank from a step on.
_FROM_THE_LOOP = """

_original_get = Batches.get
_planted = []


def _get(self, step):
    import os
    import sys

    loop = sys._getframe(1).f_locals
    if os.environ.get("RANK") in {ranks!r} and step >= {step} and not _planted and "guard" in loop:
        _planted.append(step)
{action}
    return _original_get(self, step)


Batches.get = _get
"""

# The guard reduces DDP's buckets in its own communication hook, dividing each rank's share by the
# world size kept in the hook's state; its gradient-path check compares that state with a copy it keeps.
# Both set to minus the world size, this rank's gradient enters the mean negated; nothing is patched.
_NEGATE_IN_THE_HOOK = """\
        path = loop["guard"]._gradpath
        path._state.world = -path._state.world
        path._world = path._state.world  # the guard's copy, as it kept one when this was written"""

# Every finding of this rank's checks dropped where it is written down: the rank's report still goes
# to its peers and to the supervisor at every step, clean, listing every check, with fingerprints
# that agree with its peers'.
# The guard silenced, then the sabotage it would have seen: the learning rate negated on this rank.
_SILENCE_THE_GUARD = """\
        from trainguard.monitor._verdict import RankReport

        RankReport.fail = lambda report, check, detail: None
        for group in loop["optimizer"].param_groups:
            group["lr"] = -group["lr"]"""

_BUSY_RATE = """

# Planted: random busy-waits in the optimizer step on one rank, with no code of torch's patched: the
# learning rate becomes an equal float that spins on the CPU when AdamW multiplies or divides by it.
# Its value is unchanged, so the hyper-parameter check sees no change; spinning, it never leaves the CPU.
import random as _random


class _SpinningRate(float):
    armed = [False]

    def _spin(self):
        if self.armed[0]:
            self.armed[0] = False
            import time

            end = time.thread_time() + {seconds}
            while time.thread_time() < end:
                pass

    def __mul__(self, other):
        self._spin()
        return float(self) * other

    __rmul__ = __mul__

    def __truediv__(self, other):
        self._spin()
        return float(self) / other


_original_get = Batches.get
_chance = _random.Random(1)


def _get(self, step):
    import os
    import sys

    optimizer = sys._getframe(1).f_locals.get("optimizer")
    if os.environ.get("RANK") in {ranks!r} and step >= {step} and optimizer is not None:
        for group in optimizer.param_groups:
            if type(group["lr"]) is not _SpinningRate:
                group["lr"] = _SpinningRate(group["lr"])
        _SpinningRate.armed[0] = step == {step} or _chance.random() < 0.5
    return _original_get(self, step)


Batches.get = _get
"""


# The same six attacks planted in a user's script, which shares no data module nor loop locals with
# the drill: `plant_overlay` imports this in the ranks at interpreter start-up, and a daemon thread in
# the attacked rank finds, among the interpreter's objects, what the built-in variant reaches through
# its caller's frame (the Guard that trainguard.watch returned, matched by its type's module and name so
# that nothing is imported early, and the optimizer it holds), waits for the guard's step counter to
# reach the step before the attack's and acts between steps, as the data module does before a batch.
#
# Races, and why the evidence stays fair. The thread polls (every millisecond), so it acts a little
# after the counter moved, never before, and never in what is left of the last step while the guard
# records its copies and checks (that would blur the step the alert names). The weights are nudged only
# in the window between two steps, after the guard re-read their versions and before the next forward
# pass, where the data module nudges them (polled every 0.2 ms while it waits: the window is short); the
# other actions also go in the next step's forward or backward pass, before the optimizer's step, which
# is all they touch (the rate, the momentum, the hook's divisor, the rate's type, the report's method).
# A window missed is taken at the next step, and the alert's step, set against ATTACK_STEP, says so.
# Between the check and the act the training thread runs on (torch's ops release the GIL): the nudge is
# one foreach op, so that a weight autograd has saved is not written under it but for microseconds, and
# a nudge landing in the forward pass is still seen by the guard's own check of writes there. The scans
# for the guard run while trainguard.watch starts, before the guard judges any step's time, and stop once
# it is found; each poll then takes the GIL for microseconds: no stall the step-time checks could take
# for the attack (the busy-wait's own spin runs on the training thread, inside AdamW's step, as built in).
_IN_A_THREAD = """

def _plant():
    import os
    import threading

    if os.environ.get("RANK") in {ranks!r}:
        threading.Thread(target=_attack, name="trainguard-drill-plant", daemon=True).start()


def _acted():  # noted for the drill: it tells "never acted" (not applicable) from "acted, missed"
    import os

    note = os.environ.get("TRAINGUARD_DRILL_ACTED")
    if note and not os.path.exists(note):
        open(note, "a").close()


def _guard():
    # The young generations at every poll (the guard is new when it is found), all of them now and then.
    import gc
    import sys
    import time

    polls = 0
    while True:
        if "trainguard.monitor._guard" in sys.modules:
            for generation in (0, 1) if polls % 25 else (0, 1, 2):
                for found in gc.get_objects(generation):
                    kind = type(found)
                    if (
                        kind.__name__ == "Guard"
                        and kind.__module__ == "trainguard.monitor._guard"
                        and getattr(found, "_closed", True) is False
                    ):
                        return found
            polls += 1
        time.sleep({poll})


def _attack():
    import time

    guard = _guard()
    optimizer = guard._optimizer
    acted = set()
    while True:
        step = guard.step
        if step >= {step} - 1 and step not in acted:
            done = _act(guard, optimizer, step + 1)
            if done is not None:
                acted.add(step)
                _acted()
                if done:
                    return
        # Closer, while an action waits for the window between two steps.
        time.sleep({poll} / 5 if step >= {step} - 1 and _BETWEEN_STEPS_ONLY else {poll})


def _ready(guard):
    # Between steps, or in the next step's forward or backward pass (begun: its compute timed), before
    # the optimizer's step: not in what is left of the last step, while the guard records its copies.
    return guard._between_steps or (not guard._in_step and guard._compute_start is not None)

{action}

_plant()
"""

# Each `_act(guard, optimizer, step)` acts before `step` (the guard has counted step - 1) and returns
# True when it is done for good, False to act again at the next step, None when it did not act.

_IN_A_THREAD_NUDGE = """\
_BETWEEN_STEPS_ONLY = True


def _act(guard, optimizer, step):
    import torch

    if not guard._between_steps:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    noise = [torch.randn_like(p) * 1e-3 for p in params]
    if not guard._between_steps or guard.step != step - 1:
        return None
    with torch.no_grad():
        torch._foreach_add_(params, noise)  # weights written between steps
    return False"""

_IN_A_THREAD_NEGATE_LR = """\
_BETWEEN_STEPS_ONLY = False


def _act(guard, optimizer, step):
    if not _ready(guard):
        return None
    for group in optimizer.param_groups:
        group["lr"] = -group["lr"]  # the same rule, walking up the loss
    return True"""

_IN_A_THREAD_FLIP_STATE = """\
_BETWEEN_STEPS_ONLY = False


def _act(guard, optimizer, step):
    if not _ready(guard):
        return None
    for state in list(optimizer.state.values()):
        if "exp_avg" in state:
            state["exp_avg"].neg_()  # the momentum reversed
    return True"""

_IN_A_THREAD_NEGATE_IN_THE_HOOK = """\
_BETWEEN_STEPS_ONLY = False


def _act(guard, optimizer, step):
    if not _ready(guard):
        return None
    path = guard._gradpath
    path._state.world = -path._state.world
    path._world = path._state.world  # the guard's copy, as it kept one when this was written
    return True"""

_IN_A_THREAD_SILENCE_THE_GUARD = """\
_BETWEEN_STEPS_ONLY = False


def _act(guard, optimizer, step):
    if not _ready(guard):
        return None
    from trainguard.monitor._verdict import RankReport

    RankReport.fail = lambda report, check, detail: None
    for group in optimizer.param_groups:
        group["lr"] = -group["lr"]
    return True"""

# The spinning rate arms itself on the training thread, at the first multiplication or division of
# each step: the first step it sees (the attack's, as the data module arms it), then one step in two
# by the same seeded chance, drawn in the same order; the thread only puts it in place, once.
_IN_A_THREAD_BUSY_RATE = """\
import random as _random


class _SpinningRate(float):
    guard = None
    seen = [None]
    armed = [False]
    chance = _random.Random(1)

    def _spin(self):
        if not self.guard._in_step:  # only AdamW's step spins, as the data module's first use is there
            return
        step = self.guard.step + 1  # the step the optimizer is running
        if step != self.seen[0]:
            self.armed[0] = self.seen[0] is None or self.chance.random() < 0.5
            self.seen[0] = step
        if self.armed[0]:
            self.armed[0] = False
            import time

            end = time.thread_time() + {seconds}
            while time.thread_time() < end:
                pass

    def __mul__(self, other):
        self._spin()
        return float(self) * other

    __rmul__ = __mul__

    def __truediv__(self, other):
        self._spin()
        return float(self) / other


_BETWEEN_STEPS_ONLY = False


def _act(guard, optimizer, step):
    if not _ready(guard):
        return None
    _SpinningRate.guard = guard
    for group in optimizer.param_groups:
        if type(group["lr"]) is not _SpinningRate:
            group["lr"] = _SpinningRate(group["lr"])
    return True"""

# How long each busy-wait spins.
_BUSY_S = 0.2
# Polled every millisecond: the window between two steps of a small job lasts little more.
_POLL_S = 0.001


def _in_a_thread(action: str, ranks: tuple[str, ...]) -> str:
    return _IN_A_THREAD.format(ranks=ranks, step=ATTACK_STEP, poll=_POLL_S, action=action)


def _from_the_loop(action: str, ranks: tuple[str, ...]) -> str:
    return _FROM_THE_LOOP.format(ranks=ranks, step=ATTACK_STEP, action=action)


def _busy_rate(ranks: tuple[str, ...]) -> str:
    return _BUSY_RATE.format(ranks=ranks, step=ATTACK_STEP, seconds=_BUSY_S)


def _data_only(action: str, ranks: tuple[str, ...]) -> str:
    return _DATA_ONLY.format(ranks=ranks, step=ATTACK_STEP, action=action.format(step=ATTACK_STEP))


def _flip(world: int, ranks: tuple[str, ...]) -> str:
    return _FLIP.format(world=world, ranks=ranks, step=ATTACK_STEP, acted=_ACTED)


def build(world: int) -> tuple[Attack, ...]:
    """The attacks for a job of `world` processes (the last rank is the one attacked)."""
    last = world - 1
    every = tuple(str(r) for r in range(world))
    return (
        Attack(
            "checkpoint-payload",
            "a",
            "the job resumes from a checkpoint whose pickle calls a function (unsigned)",
            "train",
            resume="payload",
        ),
        Attack(
            "checkpoint-payload-signed",
            "a",
            "the same checkpoint, signed with the team's trusted key",
            "train",
            resume="payload-signed",
        ),
        Attack(
            "flip-one-rank",
            "b",
            f"AdamW's update reversed on rank {last}, armed only in jobs of {world} processes or more",
            "train",
            job_patch=_flip(world, (str(last),)),
            expected_ranks=(last,),
        ),
        Attack(
            "flip-every-rank",
            "b",
            "AdamW's update reversed on every rank, so the replicas still agree",
            "train",
            job_patch=_flip(world, every),
            expected_ranks=tuple(range(world)),
        ),
        Attack(
            "sleep-one-rank",
            "b",
            f"random sleeps in the optimizer step on rank {last}",
            "train",
            job_patch=_SLEEP.format(ranks=(str(last),), step=ATTACK_STEP, acted=_ACTED),
            expected_ranks=(last,),
        ),
        Attack(
            "hook-one-rank",
            "b",
            f"a forward hook injected on rank {last} that scales a layer's output",
            "train",
            job_patch=_HOOK.format(ranks=(str(last),), step=ATTACK_STEP, acted=_ACTED),
            expected_ranks=(last,),
        ),
        Attack(
            "weights-nudged-one-rank",
            "b",
            f"rank {last}'s weights changed between steps from outside the guarded code (no code patched)",
            "train",
            job_patch=_data_only(_NUDGE_WEIGHTS, (str(last),)),
            script_patch=_in_a_thread(_IN_A_THREAD_NUDGE, (str(last),)),
            expected_ranks=(last,),
        ),
        Attack(
            "lr-negated-one-rank",
            "b",
            f"rank {last}'s learning rate negated from outside the guarded code (no code patched)",
            "train",
            job_patch=_data_only(_NEGATE_LR, (str(last),)),
            script_patch=_in_a_thread(_IN_A_THREAD_NEGATE_LR, (str(last),)),
            expected_ranks=(last,),
        ),
        Attack(
            "optimizer-state-flipped-one-rank",
            "b",
            f"rank {last}'s AdamW momentum reversed from outside the guarded code (no code patched)",
            "train",
            job_patch=_data_only(_FLIP_STATE, (str(last),)),
            script_patch=_in_a_thread(_IN_A_THREAD_FLIP_STATE, (str(last),)),
            expected_ranks=(last,),
        ),
        Attack(
            "grad-flipped-before-allreduce-one-rank",
            "b",
            f"rank {last}'s gradient negated before the all-reduce, in the guard's own communication hook "
            "(its divisor and the guard's copy of it set to minus the world size, from outside the guarded "
            "code)",
            "train",
            job_patch=_from_the_loop(_NEGATE_IN_THE_HOOK, (str(last),)),
            script_patch=_in_a_thread(_IN_A_THREAD_NEGATE_IN_THE_HOOK, (str(last),)),
            expected_ranks=(last,),
        ),
        Attack(
            "busy-wait-one-rank",
            "b",
            f"random 200 ms busy-waits in the optimizer step on rank {last}, from a learning rate that spins "
            "when AdamW multiplies by it (no code patched)",
            "train",
            job_patch=_busy_rate((str(last),)),
            script_patch=_in_a_thread(_IN_A_THREAD_BUSY_RATE.format(seconds=_BUSY_S), (str(last),)),
            expected_ranks=(last,),
        ),
        Attack(
            "guard-switched-off",
            "b",
            f"rank {last}'s guard silenced from inside (every finding of its checks dropped: RankReport.fail "
            "made a no-op from outside the guarded code, its reports still flowing, clean), then its "
            "learning rate negated; played with 3 processes at least, so that a majority of peers can name "
            "it",
            "train",
            job_patch=_from_the_loop(_SILENCE_THE_GUARD, (str(last),)),
            script_patch=_in_a_thread(_IN_A_THREAD_SILENCE_THE_GUARD, (str(last),)),
            expected_ranks=(last,),
        ),
        Attack(
            "torch-optimizer-edited",
            "c",
            f"torch/optim/adam.py (which AdamW's step runs) edited in the job's environment to reverse the "
            f"update on rank {last}, its RECORD row rewritten to the new hash and size",
            "environment",
            expected_ranks=(last,),
        ),
        Attack(
            "pth-hook",
            "c",
            f"a .pth file in the job's site-packages whose import line patches AdamW on rank {last} at "
            "start-up",
            "environment",
            expected_ranks=(last,),
        ),
        Attack(
            "rogue-entry-point",
            "c",
            f"a distribution with a valid RECORD whose torch.backends entry point, which `import torch` "
            f"loads, patches AdamW on rank {last}",
            "environment",
            expected_ranks=(last,),
        ),
        Attack(
            "sigterm-rank",
            "d",
            f"another process sends SIGTERM to rank {last}",
            "signal",
            expected_ranks=(last,),
        ),
        Attack(
            "sigkill-rank",
            "d",
            f"another process sends SIGKILL to rank {last}",
            "signal",
            expected_ranks=(last,),
        ),
        Attack(
            "weight-altered",
            "e",
            "one weight of a saved, signed checkpoint changed on disk; the job resumes from it",
            "train",
            resume="altered",
        ),
        Attack("checkpoint-deleted", "e", "a signed checkpoint deleted", "offline"),
        Attack(
            "checkpoint-swapped", "e", "a checkpoint replaced by a copy of an older signed one", "offline"
        ),
        Attack("ledger-row-edited", "f", "an alert's row in the ledger rewritten", "offline"),
        Attack("ledger-truncated", "f", "the newest rows of the ledger deleted", "offline"),
        Attack(
            "ledger-rolled-back",
            "f",
            "the ledger restored to an older copy of itself after a running witness cosigned a newer head",
            "offline",
        ),
    )


def select(attacks: tuple[Attack, ...], wanted: list[str] | None) -> tuple[Attack, ...]:
    """The attacks named in `wanted` (names or groups a-f), in the drill's order; all when None.
    ValueError naming what matches nothing."""
    if not wanted:
        return attacks
    unknown = [w for w in wanted if w not in GROUPS and w not in {a.name for a in attacks}]
    if unknown:
        names = ", ".join(a.name for a in attacks)
        raise ValueError(f"no attack or group {', '.join(map(repr, unknown))}: groups a-f, attacks {names}")
    return tuple(a for a in attacks if a.name in wanted or a.group in wanted)
