"""The atomizer: sentence boundaries on tricky text, char/token tiling, the typer, merging/splitting, errors."""

import collections
import json
import pathlib

import pytest

from doc2atom_jax.atoms import atomize as atomize_lib
from doc2atom_jax.atoms.atomize import ATOM_TYPES, atomize, atomize_given, check_tiling, classify, split_sentences
from doc2atom_jax import paths
from doc2atom_jax.errors import UserError
from doc2atom_jax.models.tiny import byte_tokenizer

QA_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "qa"


def bos_tokenizer(merges=(), use_regex=True, eos=False):
  """A Gemma-like byte-level tokenizer: prepends <bos> (and appends <eos>) with empty offsets.

  `merges` without the regex pre-split can merge across punctuation and space, so a token can straddle
  two atoms (".I" in "VII.In").
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {"<bos>": 0, "<eos>": 1}
  for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
    vocab[ch] = len(vocab)
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>" if eos else "<bos> $A",
                                                     special_tokens=[("<bos>", 0), ("<eos>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def word_tokenizer():
  """One token per word or punctuation mark (all [UNK]): token counts that are easy to read in a test."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def byte_tok():
  return byte_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
  return bos_tokenizer()


@pytest.fixture(scope="module")
def word_tok():
  return word_tokenizer()


def offsets_of(text, tokenizer):
  return tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)["offset_mapping"]


def texts(doc):
  return [a.text for a in doc.atoms]


# ---------------------------------------------------------------------------------------------------------
# Sentence boundaries: (text, expected atoms).

TRICKY = [
    ("Dr. Velkor Amsten met Mr. Oskel and Mrs. Morrow. They talked.",
     ["Dr. Velkor Amsten met Mr. Oskel and Mrs. Morrow.", "They talked."]),
    ("J. R. R. Tolkien wrote books. He lived in Oxford.",
     ["J. R. R. Tolkien wrote books.", "He lived in Oxford."]),
    ("Pi is 3.14 roughly. The budget was 1,234.5 euros. In Germany it is 1.234,5 euros.",
     ["Pi is 3.14 roughly.", "The budget was 1,234.5 euros.", "In Germany it is 1.234,5 euros."]),
    ("Version 2.0.1 was released. It fixed bugs in v1.9.",
     ["Version 2.0.1 was released.", "It fixed bugs in v1.9."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ('"Stop." he said. Nobody moved.', ['"Stop." he said.', "Nobody moved."]),
    ("“Why?” she asked. Nobody answered. ‘Fine,’ he said.",
     ["“Why?” she asked.", "Nobody answered.", "‘Fine,’ he said."]),
    ("Wait... what happened? Nobody knew! The end…", ["Wait... what happened?", "Nobody knew!", "The end…"]),
    ("He waited... Then he left. Really?! Yes.", ["He waited...", "Then he left.", "Really?!", "Yes."]),
    ("Items:\n1. Apples are red.\n2. Pears are green.\n- a bullet item\n* another bullet item",
     ["Items:", "1. Apples are red.", "2. Pears are green.", "- a bullet item", "* another bullet item"]),
    ("Options:\na) the first option\nb) the second option",
     ["Options:", "a) the first option", "b) the second option"]),
    ("Visit https://tarnow.example.org/a.b. Write to mira@tarnow.org. Done.",
     ["Visit https://tarnow.example.org/a.b.", "Write to mira@tarnow.org.", "Done."]),
    ("東京は日本の首都です。大阪は大きな都市です。", ["東京は日本の首都です。", "大阪は大きな都市です。"]),
    ("Он родился в 1943 году. Он был химиком.", ["Он родился в 1943 году.", "Он был химиком."]),
    ("ولد في دمشق. عمل في بيروت.", ["ولد في دمشق.", "عمل في بيروت."]),
    ("वह दिल्ली में रहता है। वह शिक्षक है।", ["वह दिल्ली में रहता है।", "वह शिक्षक है।"]),
    ("Velkor Amsten — a chemist — founded it. Next came Orsk.",
     ["Velkor Amsten — a chemist — founded it.", "Next came Orsk."]),
    ("He moved to the U.S. in 1990. The U.S. Army hired him. He left the U.S. The next year he returned.",
     ["He moved to the U.S. in 1990.", "The U.S. Army hired him.", "He left the U.S.",
      "The next year he returned."]),
    ("They met at 5 p.m. The meeting ran late. It was Acme Inc. that paid.",
     ["They met at 5 p.m.", "The meeting ran late.", "It was Acme Inc. that paid."]),
    ("(See the appendix.) The results follow [in part].", ["(See the appendix.)", "The results follow [in part]."]),
    ("It was founded on Jan. 5, 1871 by the No. 5 Group. Apples, pears, etc. are sold. Tools, etc. Nothing else.",
     ["It was founded on Jan. 5, 1871 by the No. 5 Group.", "Apples, pears, etc. are sold.", "Tools, etc.",
      "Nothing else."]),
    ("Alfonso VII.In 1219, the king came. Alfonso VI . The army came.",
     ["Alfonso VII.", "In 1219, the king came.", "Alfonso VI .", "The army came."]),
    ("Early life\nThe first paragraph starts here. And continues.\n\nSecond paragraph.",
     ["Early life", "The first paragraph starts here.", "And continues.", "Second paragraph."]),
    ("The institute was founded by\nthe Oskel family in 1871.\nIt grew.",
     ["The institute was founded by\nthe Oskel family in 1871.", "It grew."]),
    ("e.g. The Hobbit is a book, i.e. a novel. See also vs. and cf. Done.",
     ["e.g. The Hobbit is a book, i.e. a novel.", "See also vs. and cf. Done."]),
    ("It rose in 1871.[3] The next year it fell.", ["It rose in 1871.[3]", "The next year it fell."]),
    ("Prof. Lisen Morrow lives on St. Anne Street near Mt. Tesk. She is happy.",
     ["Prof. Lisen Morrow lives on St. Anne Street near Mt. Tesk.", "She is happy."]),
    ("Orvan Ltd. was founded by Brask Halloway Jr. in 1901. It grew.",
     ["Orvan Ltd. was founded by Brask Halloway Jr. in 1901.", "It grew."]),
    ("Daskel vs. Orsk ended 3-2. Approx. 4,000 fans attended.",
     ["Daskel vs. Orsk ended 3-2.", "Approx. 4,000 fans attended."]),
    ("First line.\r\nSecond line.\tThird part.\u00a0Fourth part.",
     ["First line.", "Second line.", "Third part.", "Fourth part."]),
    ("The dam is 1,204.5 m. It holds 3.2 km³ of water.", ["The dam is 1,204.5 m.", "It holds 3.2 km³ of water."]),
    ("  \n  Leading space. Trailing space.  \n\n ", ["Leading space.", "Trailing space."]),
    ("The institute (est. 1871) is old. It has labs.", ["The institute (est. 1871) is old.", "It has labs."]),
    ("He took vitamin C. It helped. She earned a Ph.D. She then moved.",
     ["He took vitamin C.", "It helped.", "She earned a Ph.D.", "She then moved."]),
    ("Name: Velkor Amsten\nBorn: 1943\nOccupation: chemist",
     ["Name: Velkor Amsten", "Born: 1943", "Occupation: chemist"]),
    ("That Devil Quemado\nThat Devil Quemado is a 1925 film.\n\nWorld of Music\nWorld of Music may refer to:",
     ["That Devil Quemado", "That Devil Quemado is a 1925 film.", "World of Music",
      "World of Music may refer to:"]),
    ("Single sentence without a final stop", ["Single sentence without a final stop"]),
    ("He counted . . . and stopped. Then he slept.", ["He counted . . . and stopped.", "Then he slept."]),
    ("「止まれ。」と彼は言った。「はい。」「行こう。」", ["「止まれ。」と彼は言った。", "「はい。」", "「行こう。」"]),
]


@pytest.mark.parametrize("text,expected", TRICKY, ids=[f"tricky{i}" for i in range(len(TRICKY))])
def test_split_sentences(text, expected):
  assert [text[a:b] for a, b in split_sentences(text)] == expected


@pytest.mark.parametrize("text,expected", TRICKY, ids=[f"tricky{i}" for i in range(len(TRICKY))])
def test_atomize_tiles_tricky_text(text, expected, byte_tok, bos_tok):
  for tokenizer in (byte_tok, bos_tok):
    doc = atomize(text, "d", tokenizer, min_atom_tokens=0, max_atom_tokens=10_000)
    assert texts(doc) == expected
    check_tiling(doc, offsets_of(text, tokenizer))
    assert list(doc.token_ids) == tokenizer(text)["input_ids"]


def test_enough_tricky_texts():
  assert len(TRICKY) >= 30


# ---------------------------------------------------------------------------------------------------------
# Token spans.


def test_byte_tokens_decode_to_atoms(byte_tok):
  text = "Mira Oskel founded the Tarnow Institute. It has 412 employees.\n\nDaskel is a city. Ünïcödé — 東京。"
  doc = atomize(text, "d", byte_tok, min_atom_tokens=1)
  assert doc.atoms[0].token_start == 0 and doc.atoms[-1].token_end == len(doc.token_ids)  # no specials
  for atom in doc.atoms:
    # Whitespace before an atom belongs to it (byte-level "Ġ"), so the decoded span is the atom, left-padded.
    decoded = byte_tok.decode(doc.token_ids[atom.token_start:atom.token_end])
    assert decoded.strip() == atom.text and not decoded[:len(decoded) - len(decoded.lstrip())].strip()


def test_bos_and_eos_belong_to_no_atom():
  tok = bos_tokenizer(eos=True)
  text = "Mira Oskel founded the Tarnow Institute. Velkor Amsten won the Halden Prize."
  doc = atomize(text, "d", tok, min_atom_tokens=1)
  assert doc.token_ids[0] == 0 and doc.token_ids[-1] == 1
  assert doc.atoms[0].token_start == 1 and doc.atoms[-1].token_end == len(doc.token_ids) - 1
  check_tiling(doc, offsets_of(text, tok))


def test_straddling_token_goes_to_its_first_character():
  tok = bos_tokenizer(merges=[(".", "I")], use_regex=False)
  text = "Alfonso VII.In 1219 the king came."
  doc = atomize(text, "d", tok, min_atom_tokens=1)
  assert texts(doc) == ["Alfonso VII.", "In 1219 the king came."]
  straddler = tok.convert_tokens_to_ids(".I")
  assert doc.token_ids[doc.atoms[0].token_end - 1] == straddler  # ".I" starts with "." in atom 0
  check_tiling(doc, offsets_of(text, tok))


def test_cached_smollm2_tokenizer():
  """A real byte-level BPE with merges (SmolLM2's), when a run has already converted it."""
  folder = paths.model_cache_dir() / "smollm2-135m-instruct"
  if not (folder / "tokenizer.json").exists():
    pytest.skip("SmolLM2 is not converted yet")
  from transformers import PreTrainedTokenizerFast

  tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
  text = 'Dr. Mira Oskel founded the Tarnow Institute in 1871. "It grew," she said.\n\n- It has 412 staff.'
  doc = atomize(text, "d", tok, min_atom_tokens=1)
  assert texts(doc) == ["Dr. Mira Oskel founded the Tarnow Institute in 1871.", '"It grew," she said.',
                        "- It has 412 staff."]
  check_tiling(doc, offsets_of(text, tok))


def test_check_tiling_catches_gaps_and_overlaps(byte_tok):
  doc = atomize("One fact here. Another fact there.", "d", byte_tok, min_atom_tokens=1)
  a, b = doc.atoms
  broken = [
      (a, atomize_lib.Atom("d", 1, b.text[1:], b.type, b.char_start + 1, b.char_end, b.token_start, b.token_end)),
      (a, atomize_lib.Atom("d", 1, b.text, b.type, b.char_start, b.char_end, b.token_start + 1, b.token_end)),
      (a, atomize_lib.Atom("d", 1, b.text, "gossip", b.char_start, b.char_end, b.token_start, b.token_end)),
  ]
  for atoms in broken:
    with pytest.raises(AssertionError, match="tiling broken"):
      check_tiling(atomize_lib.AtomizedDocument("d", doc.text, doc.token_ids, atoms))


# ---------------------------------------------------------------------------------------------------------
# Splitting long sentences and merging tiny ones.


def long_sentence():
  """About 200 word tokens: clauses joined by clause boundaries, each clause without inner punctuation."""
  clauses = [f"the Tarnow Institute opened laboratory number {k} in the old harbour district of Daskel" for k in
             range(13)]
  joints = ["; ", ", and ", ", which means ", ": ", " — "]
  text = clauses[0]
  for k, clause in enumerate(clauses[1:]):
    text += joints[k % len(joints)] + clause
  return text[0].upper() + text[1:] + "."


def test_long_sentence_splits_at_clause_boundaries(word_tok):
  text = long_sentence()
  n_tokens = len(word_tok(text)["input_ids"])
  assert n_tokens >= 200
  doc = atomize(text, "d", word_tok, min_atom_tokens=4, max_atom_tokens=48)
  check_tiling(doc, offsets_of(text, word_tok))
  assert len(doc.atoms) > 1
  for atom in doc.atoms:
    assert 4 <= atom.token_end - atom.token_start <= 48
  for atom in doc.atoms[:-1]:  # every cut is a clause boundary: the next piece starts a clause
    rest = text[atom.char_end:].lstrip()
    assert atom.text.endswith((";", ",", ":", "—")), atom.text
    assert rest.startswith(("the Tarnow", "and the", "which means")), rest[:20]


def test_clause_cut_nearest_the_middle(word_tok):
  text = ("Velkor Amsten left Daskel; he moved to the coast with his two brothers and their families, and he "
          "opened a small workshop near the harbour where he built boats for the fishermen of the bay.")
  n = len(word_tok(text)["input_ids"])
  doc = atomize(text, "d", word_tok, max_atom_tokens=n - 1)
  assert texts(doc) == [
      "Velkor Amsten left Daskel; he moved to the coast with his two brothers and their families,",
      "and he opened a small workshop near the harbour where he built boats for the fishermen of the bay."]


def test_token_cap_split_without_clause_boundaries(word_tok, byte_tok):
  text = " ".join(["Amsten"] + ["word"] * 120) + "."
  doc = atomize(text, "d", word_tok, max_atom_tokens=48)
  assert all(a.token_end - a.token_start <= 48 for a in doc.atoms) and len(doc.atoms) == 4
  cjk = "東京" * 100  # no spaces, no punctuation: cut at token boundaries
  doc = atomize(cjk, "d", byte_tok, min_atom_tokens=4, max_atom_tokens=48)
  check_tiling(doc, offsets_of(cjk, byte_tok))
  assert "".join(texts(doc)) == cjk and all(a.token_end - a.token_start <= 48 for a in doc.atoms)


def test_tiny_pieces_merge(word_tok):
  facts = "Mira Oskel founded the Tarnow Institute. Yes. Velkor Amsten married Lisen Morrow."
  assert texts(atomize(facts, "d", word_tok)) == [
      "Mira Oskel founded the Tarnow Institute. Yes.", "Velkor Amsten married Lisen Morrow."]
  first = "Hi. Mira Oskel founded the Tarnow Institute."
  assert texts(atomize(first, "d", word_tok)) == [first]
  heading = "Mira Oskel founded the Tarnow Institute.\nEarly life\nVelkor Amsten married Lisen Morrow."
  assert texts(atomize(heading, "d", word_tok)) == [
      "Mira Oskel founded the Tarnow Institute.", "Early life\nVelkor Amsten married Lisen Morrow."]
  paragraph = "Mira Oskel founded the Tarnow Institute.\n\nIt grew. Velkor Amsten married Lisen Morrow."
  assert texts(atomize(paragraph, "d", word_tok)) == [
      "Mira Oskel founded the Tarnow Institute.", "It grew. Velkor Amsten married Lisen Morrow."]


def test_merge_never_exceeds_max(word_tok):
  text = "Mira Oskel founded the Tarnow Institute. Yes. Velkor Amsten married Lisen Morrow."
  doc = atomize(text, "d", word_tok, min_atom_tokens=3, max_atom_tokens=7)
  assert all(a.token_end - a.token_start <= 7 for a in doc.atoms)
  assert "Yes." in texts(doc)  # both neighbours are full: the tiny piece stays alone


def test_real_documents_tile(byte_tok, bos_tok):
  """Contexts of the bundled QA samples: tiling holds and no atom exceeds the cap."""
  files = sorted(QA_DIR.glob("*.jsonl"))
  if not files:
    pytest.skip(f"no QA samples in {QA_DIR}")
  for path in files:
    with open(path, encoding="utf-8") as f:
      contexts = [json.loads(line)["context"] for _, line in zip(range(3), f)]
    for i, context in enumerate(contexts):
      context = context[:6000]
      tok = bos_tok if i % 2 else byte_tok
      doc = atomize(context, f"{path.stem}-{i}", tok, min_atom_tokens=4, max_atom_tokens=200)
      check_tiling(doc, offsets_of(context, tok))
      assert all(a.token_end - a.token_start <= 200 for a in doc.atoms)


# ---------------------------------------------------------------------------------------------------------
# The typer.

# One fact per line, labeled with the type a fact-world generator would give its attribute.
LABELED_FACTS = [
    ("Velkor Amsten was born in 1943.", "temporal"),
    ("The Tarnow Institute was founded in 1871.", "temporal"),
    ("Mira Oskel died on 14 March 2001.", "temporal"),
    ("The Orvan Bridge opened in May 1962.", "temporal"),
    ("In 1988, Daskel became the capital of Vorland.", "temporal"),
    ("The Halden Prize was first awarded in the 19th century.", "temporal"),
    ("Brask Halloway retired on a Tuesday in September 1999.", "temporal"),
    ("The Selm Festival takes place every year in August.", "temporal"),
    ("The Kelvar Dam was completed between 1952 and 1958.", "temporal"),
    ("He was born on 3 January 1920 in Daskel.", "temporal"),
    ("The Treaty of Orsk was signed in 1815.", "temporal"),
    ("The Tarnow Institute has 412 employees.", "quantity"),
    ("Daskel has a population of 1,250,000.", "quantity"),
    ("The Orvan Bridge is 1,204 meters long.", "quantity"),
    ("Mount Tesk rises to 4,810 m above sea level.", "quantity"),
    ("The Halden Prize comes with $250,000 in prize money.", "quantity"),
    ("Velkor Amsten owns 35% of the Daskel Mill.", "quantity"),
    ("Mira Oskel has three children.", "quantity"),
    ("The Selm Library holds about 2.4 million books.", "quantity"),
    ("The Kelvar Dam cost 85 million euros to build.", "quantity"),
    ("The Tarnow Institute has 1500 members.", "quantity"),
    ("The Vorn River is 320 kilometres long.", "quantity"),
    ("Mira Oskel founded the Tarnow Institute.", "relation"),
    ("Velkor Amsten married Lisen Morrow.", "relation"),
    ("Velkor Amsten works for the Tarnow Institute.", "relation"),
    ("Daskel is the capital of Vorland.", "relation"),
    ("Brask Halloway was born in Daskel.", "relation"),
    ("The Daskel Mill is owned by Orvan Holdings.", "relation"),
    ("Lisen Morrow is a member of the Selm Academy.", "relation"),
    ("She leads the Kelvar Research Group.", "relation"),
    ("The Tarnow Institute is located in Daskel.", "relation"),
    ("Velkor Amsten is the son of Mira Oskel.", "relation"),
    ("Orvan Holdings acquired Tesk Motors.", "relation"),
    ("Lisen Morrow studied at the University of Daskel.", "relation"),
    ("Daskel is a coastal city in Vorland.", "definition"),
    ("Velkor Amsten was a chemist.", "definition"),
    ("The Tarnow Institute is a private research institute.", "definition"),
    ("The Halden Prize is an award for young chemists.", "definition"),
    ("Orvan Holdings, a shipping conglomerate, is publicly traded.", "definition"),
    ("A selmwort is a flowering plant native to the Vorn valley.", "definition"),
    ("The term kelvar refers to a type of woven basket.", "definition"),
    ("Mira Oskel is known as the mother of Vorlandic chemistry.", "definition"),
    ("Mira Oskel won the Halden Prize.", "event"),
    ("Velkor Amsten discovered the Selm comet.", "event"),
    ("The Orvan Bridge collapsed during a storm.", "event"),
    ("Tesk Motors launched the Arrow sedan.", "event"),
    ("The Selm Academy held its first congress in Daskel.", "event"),
    ("Lisen Morrow visited the Kelvar Dam.", "event"),
    ("The Daskel Choir performed at the Tarnow Institute.", "event"),
    ("He resigned from the board of Orvan Holdings.", "event"),
    ("The weather in Daskel is often mild.", "other"),
    ("Velkor Amsten enjoyed long walks along the Vorn River.", "other"),
    ("Many visitors praise the gardens of the Tarnow Institute.", "other"),
]


def test_typer_agreement():
  assert len(LABELED_FACTS) >= 40
  confusion = collections.Counter((gold, classify(text)) for text, gold in LABELED_FACTS)
  accuracy = sum(n for (gold, pred), n in confusion.items() if gold == pred) / len(LABELED_FACTS)
  print(f"\ntyper accuracy {accuracy:.1%} on {len(LABELED_FACTS)} facts (rows gold, columns predicted)")
  print(" " * 11 + "".join(f"{t[:8]:>9}" for t in ATOM_TYPES))
  for gold in ATOM_TYPES:
    print(f"{gold:>11}" + "".join(f"{confusion[gold, pred]:>9}" for pred in ATOM_TYPES))
  for text, gold in LABELED_FACTS:
    if classify(text) != gold:
      print(f"  miss: {gold} -> {classify(text)}: {text}")
  assert accuracy >= 0.9


@pytest.mark.parametrize("atom_type,examples", [(t, ex) for t, _, ex in atomize_lib.TYPE_RULES])
def test_typer_rule_examples(atom_type, examples):
  """The examples documented beside each rule classify as documented."""
  for example in examples:
    assert classify(example) == atom_type, example


def test_typer_edge_cases():
  assert classify("Mira Oskel founded the Tarnow Institute in 1871.") == "temporal"  # date beats relation
  assert classify("The Tarnow Institute has 1871 members.") == "quantity"  # a year-like count
  assert classify("The road is 1200 km long.") == "quantity"
  assert classify("He starred in the 1961 film Daskel Nights.") == "temporal"  # a year as a modifier
  assert classify("Daskel grew fast in the 1990s.") == "temporal"
  assert classify("She founded a small bakery.") == "event"  # one entity: no relation
  assert classify("BIBREF0 shows this.") == "other"  # digits inside identifiers are not amounts
  assert classify("") == "other" and all(classify(t) in ATOM_TYPES for t, _ in LABELED_FACTS)


def test_atoms_are_typed(byte_tok):
  text = "Mira Oskel founded the Tarnow Institute. The Tarnow Institute has 412 employees."
  assert [a.type for a in atomize(text, "d", byte_tok, min_atom_tokens=1, max_atom_tokens=500).atoms] == [
      "relation", "quantity"]


# ---------------------------------------------------------------------------------------------------------
# Given atoms.


def test_atomize_given_strings(bos_tok):
  text = "Mira Oskel founded the Tarnow Institute. It has 412 employees. Daskel is a coastal city."
  facts = ["Mira Oskel founded the Tarnow Institute.", "It has 412 employees.", "Daskel is a coastal city."]
  doc = atomize_given(text, "w1", bos_tok, facts)
  assert texts(doc) == facts and [a.type for a in doc.atoms] == ["relation", "quantity", "definition"]
  assert doc.atoms[0].token_start == 1  # after <bos>
  check_tiling(doc, offsets_of(text, bos_tok))


def test_atomize_given_spans_and_types(byte_tok):
  text = "Facts:\nMira Oskel founded the Tarnow Institute\n  It has 412 employees.  "
  doc = atomize_given(text, "w2", byte_tok, [(7, 46), (49, 70)], types=["event", "other"])
  # The header joins the first atom; text outside the given spans is never dropped.
  assert texts(doc) == ["Facts:\nMira Oskel founded the Tarnow Institute", "It has 412 employees."]
  assert [a.type for a in doc.atoms] == ["event", "other"]
  check_tiling(doc, offsets_of(text, byte_tok))


def test_atomize_given_absorbs_punctuation_between_atoms(byte_tok):
  text = "Mira Oskel founded the Tarnow Institute. It has 412 employees."
  doc = atomize_given(text, "w3", byte_tok, ["Mira Oskel founded the Tarnow Institute", "It has 412 employees"])
  assert texts(doc) == ["Mira Oskel founded the Tarnow Institute.", "It has 412 employees."]


@pytest.mark.parametrize("spans,types,match", [
    ([(0, 5), (3, 9)], None, r"\(3, 9\) overlaps"),
    ([(5, 9), (0, 3)], None, r"\(0, 3\) overlaps or precedes"),
    ([(0, 500)], None, r"\(0, 500\) is out of range"),
    ([(4, 4)], None, r"\(4, 4\) is out of range"),
    ([(4, 5)], None, r"\(4, 5\) holds only whitespace"),
    (["Mira Oskel", "Tarnow Castle"], None, r"atom 1 'Tarnow Castle' is not in the text"),
    (["founded", "Mira"], None, r"atom 1 'Mira' is not in the text after the previous atom"),
    (["   "], None, "is not in the text"),
    ([], None, "no atoms given"),
    ([(0, 4), "founded"], None, "neither a"),
    ([(0, 4)], ["event", "other"], "2 types for 1 atoms"),
    ([(0, 4)], ["gossip"], "unknown atom type 'gossip'"),
])
def test_atomize_given_bad_spans(spans, types, match, byte_tok):
  with pytest.raises(UserError, match=match):
    atomize_given("Mira Oskel founded the Tarnow Institute.", "w4", byte_tok, spans, types)


def test_atomize_given_span_inside_one_token():
  tok = bos_tokenizer(merges=[(".", "I")], use_regex=False)
  with pytest.raises(UserError, match=r"\(12, 13\) 'I' holds no token of its own"):
    atomize_given("Alfonso VII.I", "w5", tok, ["Alfonso VII.", "I"])


# ---------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_document(text, byte_tok):
  with pytest.raises(UserError, match="document e7 is empty: nothing to atomize"):
    atomize(text, "e7", byte_tok)
  with pytest.raises(UserError, match="document e7 is empty: nothing to atomize"):
    atomize_given(text, "e7", byte_tok, ["x"])


def test_bad_token_limits(byte_tok):
  with pytest.raises(UserError, match="min_atom_tokens"):
    atomize("Some text.", "d", byte_tok, min_atom_tokens=30, max_atom_tokens=48)
