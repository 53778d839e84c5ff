"""EDA text augmentation (Wei & Zou 2019) as DeCLIP uses it for its second text view.

DeCLIP (Sense-GVT/DeCLIP declip.py:154-210) applies ONE operation per caption, chosen uniformly
from ``textaugment.EDA``'s synonym_replacement (n=1), random_swap (n=1) and random_deletion
(p=0.1), with textaugment's defaults. These functions reproduce textaugment 2.0 (eda.py:40-277):
whitespace split, stopwords = NLTK's English list, synonyms from WordNet lemmas (lowercased,
``_``/``-`` -> space, only ``a-z`` and space kept, the word itself removed, sorted then
shuffled), the same sequence of random draws, but from the ``random.Random`` passed in instead
of the global ``random`` module, so each sample is reproducible on its own
(``sample_rng(seed, epoch, index)``). random_insertion is here too (not in DeCLIP's choice).

Deviations: a text with no words comes back unchanged (textaugment raises), and
random_insertion on a text of stopwords only returns it unchanged (textaugment raises
ValueError from ``randint(0, -1)``).

WordNet is read offline with nltk's corpus reader from ``corpora/wordnet`` under one of
``nltk.data.path`` (``$NLTK_DATA``, ``~/nltk_data``, ``<venv>/nltk_data``, ...).
``scripts/setup_env.sh`` installs Debian's ``wordnet-base`` + ``wordnet-sense-index`` and lays
them out in ``.venv/nltk_data`` (``python -m alip.text_aug install-wordnet DIR``); no WordNet
is an error saying so, never a silent fallback.
"""
import random
import shutil
import sys
import warnings
from pathlib import Path

# NLTK's English stopword list (the 179 words of nltk_data's stopwords/english that textaugment
# loads with ``stopwords.words('english')``), kept here so no second nltk corpus is needed.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their
theirs themselves what which who whom this that that'll these those am is are was were be been
being have has had having do does did doing a an the and but if or because as until while of
at by for with about against between into through during before after above below to from up
down in out on off over under again further then once here there when where why how all any
both each few more most other some such no nor not only own same so than too very s t can will
just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn
mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn
wouldn't
""".split())

DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv",
                 "index.noun", "index.verb", "index.sense", "adj.exc", "adv.exc", "noun.exc",
                 "verb.exc")
# WordNet 3.0's lexicographer files, lexnames(5WN); nltk needs the file, Debian does not ship it.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
HOW_TO_INSTALL = (
    "run scripts/setup_env.sh (as root it apt-get installs wordnet-base and wordnet-sense-index "
    "and lays them out in .venv/nltk_data), or: apt-get install wordnet-base wordnet-sense-index "
    "&& python -m alip.text_aug install-wordnet <dir on nltk.data.path>; with network access "
    "nltk.download('wordnet') works too")

_wordnet = None


class WordNetMissing(RuntimeError):
    pass


def install_wordnet(target, source=DEBIAN_WORDNET):
    """Lay out WordNet 3.0 dict files from ``source`` as ``target/corpora/wordnet`` (idempotent)."""
    source, dest = Path(source), Path(target) / "corpora" / "wordnet"
    missing = [f for f in WORDNET_FILES if not (source / f).is_file()]
    if missing:
        raise WordNetMissing(f"install_wordnet: {source} lacks {', '.join(missing)}; "
                             f"apt-get install wordnet-base wordnet-sense-index")
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        if not (dest / name).is_file() or (dest / name).stat().st_size != (source / name).stat().st_size:
            shutil.copyfile(source / name, dest / name)
    lines = [f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)]
    (dest / "lexnames").write_text("".join(lines))
    return dest


def wordnet():
    """nltk's WordNet reader over the offline copy; raises WordNetMissing if there is none."""
    global _wordnet
    if _wordnet is None:
        try:
            import nltk
            from nltk.corpus.reader.wordnet import WordNetCorpusReader
        except ImportError as e:
            raise WordNetMissing(f"alip.text_aug needs nltk (pip install -r requirements.txt): {e}")
        try:
            root = nltk.data.find("corpora/wordnet")
        except LookupError:
            raise WordNetMissing(f"WordNet not found in nltk's data path {nltk.data.path}: "
                                 f"{HOW_TO_INSTALL}") from None
        class EnglishWordNet(WordNetCorpusReader):
            def map_wn(self, version="wordnet"):
                """No WordNet-version map: nltk builds one from index.sense at every start
                (about half of the reader's 7.6 s here, in each DataLoader worker), for the
                multilingual (OMW) lemmas only (its ``map30``), which EDA never reads."""
                return None

        with warnings.catch_warnings():  # English only: no multilingual (OMW) reader wanted
            warnings.filterwarnings("ignore", message="The multilingual functions")
            _wordnet = EnglishWordNet(root, None)
    return _wordnet


def synonyms(word, rng):
    """textaugment's ``_get_synonyms``: the word's WordNet lemmas, cleaned, sorted, shuffled."""
    found = set()
    for syn in wordnet().synsets(word):
        for lemma in syn.lemmas():
            name = lemma.name().replace("_", " ").replace("-", " ").lower()
            found.add("".join(c for c in name if c in " qwertyuiopasdfghjklzxcvbnm"))
    found.discard(word)
    found = sorted(found)
    rng.shuffle(found)
    return found


def synonym_replacement(text, rng, n=1):
    """Replace every occurrence of up to n distinct non-stopwords with one random synonym each."""
    words = text.split()
    candidates = sorted({w for w in words if w not in STOPWORDS})
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        found = synonyms(word, rng)
        if found:
            synonym = rng.choice(found)
            words = [synonym if w == word else w for w in words]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(words) if words else text


def random_swap(text, rng, n=1):
    """Swap two random positions, n times. As textaugment, the second index is redrawn while it
    equals the first, and the 4th draw gives up without swapping."""
    words = text.split()
    if not words:
        return text
    for _ in range(n):
        i = rng.randint(0, len(words) - 1)
        for attempt in range(4):
            j = rng.randint(0, len(words) - 1)
            if attempt == 3:
                break
            if j != i:
                words[i], words[j] = words[j], words[i]
                break
    return " ".join(words)


def random_deletion(text, rng, p=0.1):
    """Drop each word with probability p; a single word is kept; if all go, one random word."""
    words = text.split()
    if len(words) <= 1:
        return words[0] if words else text
    kept = [w for w in words if rng.uniform(0, 1) > p]
    return " ".join(kept) if kept else rng.choice(words)


def random_insertion(text, rng, n=1):
    """Insert a synonym of a random non-stopword at a random position, n times. As textaugment,
    up to 10 words are tried for synonyms and the 10th try gives up whatever it found."""
    words = text.split()
    for _ in range(n):
        candidates = [w for w in words if w not in STOPWORDS]
        if not candidates:
            break
        for attempt in range(10):
            found = synonyms(candidates[rng.randint(0, len(candidates) - 1)], rng)
            if found or attempt == 9:
                break
        if found and attempt < 9:
            words.insert(rng.randint(0, len(words) - 1), found[0])
    return " ".join(words) if words else text


DECLIP_OPS = (synonym_replacement, random_swap, random_deletion)
ALL_OPS = DECLIP_OPS + (random_insertion,)


def eda(text, rng, ops=DECLIP_OPS):
    """One operation, chosen uniformly with ``rng``, applied with its default strength."""
    return rng.choice(ops)(text, rng)


def sample_rng(seed, epoch, index):
    """A ``random.Random`` for one sample, the same in every process and worker."""
    return random.Random(f"alip-eda/{seed}/{epoch}/{index}")


def eda_batch(texts, seed, epoch, indices, ops=DECLIP_OPS):
    """``eda`` over a batch, sample i seeded by (seed, epoch, indices[i])."""
    return [eda(t, sample_rng(seed, epoch, i), ops) for t, i in zip(texts, indices)]


def main(argv):
    if len(argv) != 2 or argv[0] != "install-wordnet":
        sys.exit("usage: python -m alip.text_aug install-wordnet DIR")
    try:
        print(f"WordNet laid out in {install_wordnet(argv[1])}")
    except WordNetMissing as e:
        sys.exit(f"alip.text_aug: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])


_TOKENIZER = None


def eda_tokens(tokens, rng, sot_id=49406, eot_id=49407):
    """EDA as a text view on a token row (``alip.data.text_views``): the BPE ids between SOT and
    the first EOT decoded with open_clip's tokenizer, ``eda`` applied, re-tokenised as wide as
    the row (77 for today's raw text; a caption stored 256 wide and read as raw text,
    ``--raw-fields caption``, keeps its 256 positions: before, every row came back 77 wide and
    the loader refused the batch). Runs in the loader workers (torch) or the thread pool beside
    DALI."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from open_clip.tokenizer import SimpleTokenizer
        _TOKENIZER = SimpleTokenizer()
    ids = tokens.tolist()
    end = ids.index(eot_id) if eot_id in ids else len(ids)
    text = _TOKENIZER.decode([i for i in ids[1 if ids and ids[0] == sot_id else 0:end]]).strip()
    return _TOKENIZER([eda(text, rng) if text else text], context_length=len(ids))[0]
