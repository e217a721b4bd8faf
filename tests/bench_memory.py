"""The memory benchmark: tell it twenty facts in one session, ask for them in the next.

Not part of the unit suite (it measures; it asserts nothing). Run from the repository root:

    python tests/bench_memory.py                      # a fresh folder, the seed corpus, no training
    python tests/bench_memory.py --folder DIR         # a copy of DIR (its memory.sqlite3 and macrogpt.ckpt)
    python tests/bench_memory.py --filler 200         # 200 other messages between telling and asking

Session one tells each fact, followed by a small-talk turn. Session two (a new Session on the same
files, as after a restart) asks about each fact, asks about things never told, and makes small
talk. It prints recall (the reply holds the fact's key word), false answers (a reply to a question
about something never told holds a fact's key word), parroting (a small-talk reply holds one), and
the reply time inside the process (median and max of Session.respond). Sessions run in this
process without training, as `python macrogpt.py --no-train` does: remembering must not wait for
a burst. The folder given is copied; nothing in it is changed.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import macrogpt as M  # noqa: E402

# (what the user says, what the user asks later, the key word a recalling reply contains)
FACTS = [
    ("my dog is called Biscotti", "what is my dog called?", "Biscotti"),
    ("I live in Ljubljana", "where do I live?", "Ljubljana"),
    ("my son is called Tobiasz", "what is my son's name?", "Tobiasz"),
    ("my favourite colour is ochre", "what is my favourite colour?", "ochre"),
    ("my locker number is 5831", "what is my locker number?", "5831"),
    ("my sister works as a glassblower", "what does my sister do for a living?", "glassblower"),
    ("my cat is called Мурзик", "what is my cat called?", "Мурзик"),
    ("I was born in Querétaro", "where was I born?", "Querétaro"),
    ("my grandmother's name is 美代子", "what is my grandmother's name?", "美代子"),
    ("my boat is called Halcyon", "what is my boat called?", "Halcyon"),
    ("my flat is on the 14th floor", "which floor is my flat on?", "14"),
    ("my favourite food is pierogi", "what is my favourite food?", "pierogi"),
    ("my best friend is called Søren", "what is my best friend called?", "Søren"),
    ("my car is a green Škoda", "what car do I have?", "Škoda"),
    ("my daughter plays the bassoon", "which instrument does my daughter play?", "bassoon"),
    ("my parrot is called Κίκο", "what is my parrot called?", "Κίκο"),
    ("I work in a bakery in Valparaíso", "which city do I work in?", "Valparaíso"),
    ("my PIN hint is the year 1987", "what year is my PIN hint?", "1987"),
    ("my horse is called Thistledown", "what is my horse called?", "Thistledown"),
    ("my brother lives in 부산", "where does my brother live?", "부산"),
]
NEVER_TOLD = [
    "what is my wife's name?", "where does my father live?", "what is my goldfish called?",
    "what is my phone number?", "which street do I live on?", "what is my aunt called?",
    "what is my favourite film?", "how old is my uncle?", "what is my teacher's name?",
    "which language does my neighbour speak?",
]
SMALL_TALK = [
    "what a grey morning it is", "do you like music?", "tell me something about the sea",
    "I had soup for lunch", "how are you today?", "the train was late again", "do you ever sleep?",
    "it rained all night", "what do you think about books?", "I am a bit tired",
    "have you seen the moon tonight?", "I walked for an hour", "what makes you happy?",
    "the kettle is boiling", "do you like winter?", "my tea went cold", "what is a good question?",
    "I found a coin in the street", "the garden needs water", "do you dream?",
]


def hit(reply, word):
    return M.fold_case(word) in M.fold_case(reply)


def run(folder, corpus, filler, seed):
    cfg = M.Config()
    db, ckpt = os.path.join(folder, "memory.sqlite3"), os.path.join(folder, "macrogpt.ckpt")
    times = []

    def session():
        return M.Session(cfg, corpus, db, ckpt, seed)

    def say(s, text):
        t0 = time.perf_counter()
        reply = s.respond(text)
        times.append(time.perf_counter() - t0)
        return reply

    rng = random.Random(seed)
    s = session()
    try:
        for (tell, _, _), talk in zip(FACTS, SMALL_TALK):
            say(s, tell)
            say(s, talk)
        for _ in range(filler):
            say(s, rng.choice(SMALL_TALK))
    finally:
        s.close()
    s = session()
    out = {"recalled": [], "false": [], "parroted": []}
    try:
        for _, ask, key in FACTS:
            reply = say(s, ask)
            out["recalled"].append((ask, reply, hit(reply, key)))
        keys = [key for _, _, key in FACTS]
        for ask in NEVER_TOLD:
            reply = say(s, ask)
            out["false"].append((ask, reply, any(hit(reply, k) for k in keys)))
        for talk in SMALL_TALK:
            reply = say(s, talk)
            out["parroted"].append((talk, reply, any(hit(reply, k) for k in keys)))
    finally:
        s.close()
    return out, times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", help="a folder holding memory.sqlite3 and macrogpt.ckpt (copied, never changed)")
    p.add_argument("--corpus", default=os.path.join(ROOT, "nonames.txt"))
    p.add_argument("--filler", type=int, default=0, help="small-talk messages between telling and asking")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", action="store_true", help="print every question and reply")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("memory.sqlite3", "macrogpt.ckpt"):
            if args.folder and os.path.exists(os.path.join(args.folder, name)):
                shutil.copy(os.path.join(args.folder, name), os.path.join(tmp, name))
        t0 = time.perf_counter()
        out, times = run(tmp, args.corpus, args.filler, args.seed)
        wall = time.perf_counter() - t0
    if args.show:
        for kind, rows in out.items():
            for text, reply, flag in rows:
                print("%-9s %s %s -> %s" % (kind, "+" if flag else " ", text, reply))
    recalled = sum(f for _, _, f in out["recalled"])
    false = sum(f for _, _, f in out["false"])
    parroted = sum(f for _, _, f in out["parroted"])
    result = {"recalled": recalled, "facts": len(FACTS), "false_answers": false, "never_told": len(NEVER_TOLD),
              "parroted": parroted, "small_talk": len(SMALL_TALK), "filler": args.filler,
              "reply_median_s": round(statistics.median(times), 3), "reply_max_s": round(max(times), 3),
              "replies": len(times), "wall_s": round(wall, 1), "python": sys.version.split()[0],
              "folder": args.folder}
    print("recalled %d/%d | false answers %d/%d | parroted %d/%d | reply median %.3f s, max %.3f s (%d replies)"
          % (recalled, len(FACTS), false, len(NEVER_TOLD), parroted, len(SMALL_TALK),
             result["reply_median_s"], result["reply_max_s"], len(times)))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
