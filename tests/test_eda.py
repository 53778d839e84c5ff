"""EDA (alip/text_aug.py): each operation on fixed seeds, its invariants, DeCLIP's one-op choice,
per-sample seeding, and the offline WordNet set-up and its missing-data error."""
import collections
import random

import pytest

import alip.text_aug as ta

TEXT = "a small brown dog runs across the green field near a dog house"


@pytest.mark.parametrize("op, seed, expected", [
    (ta.synonym_replacement, 0, "a small brown dog race across the green field near a dog house"),
    (ta.synonym_replacement, 1,
     "a small brown dog runs across the green field near a dog star sign"),
    (ta.random_swap, 0, "a small brown dog runs across house green field near a dog the"),
    (ta.random_swap, 1, "a small near dog runs across the green field brown a dog house"),
    (ta.random_deletion, 0, TEXT),
    (ta.random_deletion, 1, "a small brown dog runs across the green a dog house"),
    (ta.random_insertion, 0,
     "a small brown dog runs champaign across the green field near a dog house"),
    (ta.random_insertion, 1,
     "weenie a small brown dog runs across the green field near a dog house"),
])
def test_ops_on_fixed_seeds(op, seed, expected):
    assert op(TEXT, random.Random(seed)) == expected


def test_synonyms_come_from_wordnet_cleaned_sorted_then_shuffled():
    found = ta.synonyms("dog", random.Random(0))
    assert sorted(found) == [
        "andiron", "blackguard", "bounder", "cad", "canis familiaris", "chase", "chase after",
        "click", "detent", "dog iron", "domestic dog", "firedog", "frank", "frankfurter",
        "frump", "give chase", "go after", "heel", "hot dog", "hotdog", "hound", "pawl", "tag",
        "tail", "track", "trail", "weenie", "wiener", "wienerwurst"]
    assert found != sorted(found)  # shuffled with the given rng
    assert found == ta.synonyms("dog", random.Random(0))
    assert ta.synonyms("the", random.Random(0)) == []


def test_op_invariants_over_many_seeds():
    words = TEXT.split()
    candidates = {" ".join(syn if x == w else x for x in words)
                  for w in set(words) - ta.STOPWORDS for syn in ta.synonyms(w, random.Random())}
    for seed in range(200):
        swapped = ta.random_swap(TEXT, random.Random(seed)).split()
        assert sorted(swapped) == sorted(words)
        assert sum(a != b for a, b in zip(swapped, words)) in (0, 2)
        kept = ta.random_deletion(TEXT, random.Random(seed)).split()
        it = iter(words)
        assert all(w in it for w in kept) and kept  # a non-empty subsequence
        # one distinct non-stopword, every occurrence, by one of its synonyms
        replaced = ta.synonym_replacement(TEXT, random.Random(seed))
        assert replaced in candidates, replaced
        inserted = ta.random_insertion(TEXT, random.Random(seed))
        assert len(inserted.split()) > len(words)


# textaugment 2.0 eda.py:56-68 and :105-119, the global ``random`` replaced by ``rng``
def _textaugment_swap_word(new_words, rng):
    random_idx_1 = rng.randint(0, len(new_words) - 1)
    random_idx_2 = random_idx_1
    counter = 0
    while random_idx_2 == random_idx_1:
        random_idx_2 = rng.randint(0, len(new_words) - 1)
        counter += 1
        if counter > 3:
            return new_words
    new_words[random_idx_1], new_words[random_idx_2] = new_words[random_idx_2], new_words[random_idx_1]
    return new_words


def _textaugment_add_word(new_words, rng):
    synonyms = list()
    counter = 0
    while len(synonyms) < 1:
        random_word_list = list([word for word in new_words if word not in ta.STOPWORDS])
        random_word = random_word_list[rng.randint(0, len(random_word_list) - 1)]
        synonyms = ta.synonyms(random_word, rng)
        counter += 1
        if counter >= 10:
            return new_words
    random_synonym = synonyms[0]
    random_idx = rng.randint(0, len(new_words) - 1)
    new_words.insert(random_idx, random_synonym)
    return new_words


def test_swap_and_insertion_give_up_as_textaugment_does():
    # two words: 1 in 8 swaps gives up after 3 equal draws; words without synonyms make
    # insertion retry, and its 10th try gives up whatever it found
    for seed in range(300):
        for text in ("dog cat", "dog cat bird"):
            assert ta.random_swap(text, random.Random(seed)) == " ".join(
                _textaugment_swap_word(text.split(), random.Random(seed)))
        text = "qzx1 qzx2 qzx3 qzx4 dog"
        assert ta.random_insertion(text, random.Random(seed)) == " ".join(
            _textaugment_add_word(text.split(), random.Random(seed)))


def test_edge_cases_keep_the_text():
    rng = random.Random(0)
    for op in ta.ALL_OPS:
        assert op("", rng) == ""
        assert op("   ", rng) == "   "
    assert ta.random_deletion("dog", rng) == "dog"
    assert ta.random_swap("dog", rng) == "dog"
    assert ta.random_insertion("the a of", rng) == "the a of"  # stopwords only
    assert ta.synonym_replacement("the a of", rng) == "the a of"


def test_eda_picks_one_of_declip_ops_uniformly():
    counts = collections.Counter()
    for i in range(600):
        rng = ta.sample_rng(0, 0, i)
        replay = random.Random()
        replay.setstate(rng.getstate())
        out = ta.eda(TEXT, rng)
        chosen = replay.choice(ta.DECLIP_OPS)  # eda = one choice, then that op, same rng
        assert out == chosen(TEXT, replay)
        counts[chosen.__name__] += 1
    assert set(counts) == {"synonym_replacement", "random_swap", "random_deletion"}
    for n in counts.values():  # 1/3 each, within 5 sigma
        assert abs(n / 600 - 1 / 3) < 5 * (2 / 9 / 600) ** 0.5


def test_eda_batch_is_seeded_per_sample():
    texts = [TEXT, "a cat on a mat", "two dogs play in the snow"]
    a = ta.eda_batch(texts, seed=0, epoch=0, indices=[10, 11, 12])
    assert a == ta.eda_batch(texts, seed=0, epoch=0, indices=[10, 11, 12])
    # a sample's result depends on its own index only, not on its batch neighbours
    assert ta.eda_batch(texts[1:], seed=0, epoch=0, indices=[11, 12]) == a[1:]
    outs = {ta.eda(TEXT, ta.sample_rng(0, e, 10)) for e in range(30)}
    assert len(outs) > 5  # another epoch draws again


def test_install_wordnet_lays_out_a_readable_corpus(tmp_path, monkeypatch):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    dest = ta.install_wordnet(tmp_path)
    assert dest == tmp_path / "corpora" / "wordnet"
    lex = (dest / "lexnames").read_text().splitlines()
    assert len(lex) == 45
    assert lex[0] == "00\tadj.all\t3" and lex[3] == "03\tnoun.Tops\t1" and lex[44] == "44\tadj.ppl\t3"
    assert ta.install_wordnet(tmp_path) == dest  # idempotent
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.warns(UserWarning, match="multilingual"):  # English only, no OMW reader
        reader = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    dog = reader.synsets("dog")[0]
    assert (dog.name(), dog.offset()) == ("dog.n.01", 2084071)
    assert dog.lexname() == "noun.animal"  # lex_filenum 05 in data.noun, read via lexnames


def test_install_wordnet_names_missing_source_files(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ta.WordNetMissing, match="lacks data.adj.*apt-get install wordnet-base"):
        ta.install_wordnet(tmp_path / "dest", source=tmp_path / "src")


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(ta, "_wordnet", None)
    with pytest.raises(ta.WordNetMissing, match="WordNet not found.*setup_env.sh"):
        ta.synonym_replacement(TEXT, random.Random(0))
