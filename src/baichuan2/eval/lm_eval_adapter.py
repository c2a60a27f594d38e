"""Run our checkpoints under EleutherAI's lm-evaluation-harness as the registered model type ``baichuan2``.

    lm_eval --model baichuan2 --model_args pretrained=runs/x/release/final,batch_size=8 --tasks ...

or in Python: ``lm_eval.simple_evaluate(model=Baichuan2LM("ckpt"), tasks=[...])``. Log-likelihoods come
from the same batched scorer as ``baichuan2 eval`` (so results agree), generation from our KV-cache
sampler with lm-eval's ``until`` stop strings.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from baichuan2.eval.scoring import continuation_logprobs, token_nll


@register_model("baichuan2")
class Baichuan2LM(TemplateLM):
    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, dtype: str = "auto", device: str = "auto", **_):
        super().__init__()
        if model is None:
            from baichuan2.model.checkpoint import load_pretrained
            from baichuan2.tokenizer import Tokenizer

            if not pretrained:
                raise ValueError("baichuan2 model needs pretrained=<checkpoint directory>")
            model = load_pretrained(pretrained, dtype=dtype, device=device)
            tokenizer = Tokenizer.from_pretrained(pretrained)
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.config.max_position_embeddings

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return continuation_logprobs(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = [self.tok.bos_id] + self.tok.encode(req.args[0])
            w = self.max_length
            # windows overlapping by one token: each token after bos is predicted exactly once
            rows = [ids[i: i + w] for i in range(0, len(ids) - 1, w - 1)]
            out.append(-sum(token_nll(self.model, rows, self.batch_size)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from baichuan2.model.generate import SamplingConfig, generate

        results = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0))
            cfg = SamplingConfig(max_new_tokens=max_new, do_sample=temperature > 0 and kwargs.get("do_sample", True),
                                 temperature=temperature or 1.0, top_k=0, top_p=1.0,
                                 stop_token_ids=[self.tok.eos_id])
            ids = ([self.tok.bos_id] + self.tok.encode(context))[-(self.max_length - max_new):]
            text = self.tok.decode(generate(self.model, [ids], cfg)[0])
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            results.append(text)
        return results
