"""LLaMA-Factory's own text metrics (BLEU-4, ROUGE-1/2/L of predict_with_generate) on fixed pairs.

Runs `llamafactory.train.sft.metric.ComputeSimilarity` itself: a stand-in tokenizer "decodes" row i to the i-th
prediction or label, so the metric code sees exactly these strings. Writes, per pair, the jieba cuts of both
sides and the per-sample scores, and the corpus scores (numpy mean), to
tests/fixtures/golden/metrics/metrics.json.

Run: tools/golden/.venv/bin/python tools/golden/gen_metrics.py
"""

import json
import os
from importlib.metadata import version

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "metrics", "metrics.json")

ROBOT_ZH = "这是一个白色的服务机器人，它有圆形的头部，有两只机械臂，末端装有夹爪，靠轮子移动。它胸前有一块显示屏，头顶没有天线。背景是工厂车间。"
ROBOT_EN = ("This is a white service robot with a round head and two arms with grippers. It moves on wheels. "
            "It has a screen on its chest and no antenna. The picture was taken in a factory.")

# (name, prediction, label)
PAIRS = [
    ("zh_identical", ROBOT_ZH, ROBOT_ZH),
    ("en_identical", ROBOT_EN, ROBOT_EN),
    ("zh_partial", "这是一个红色的机器人，它有方形的头部，没有机械臂，用两条腿行走。", ROBOT_ZH),
    ("zh_other_template", "这个机器人的机身是白色的，头部呈圆形，有两只机械臂，末端装有夹爪，靠轮子移动。胸前有一块显示屏，头顶没有天线，背景是工厂车间。", ROBOT_ZH),
    ("en_partial", "This is a red robot with a square head and no arms. It walks on two legs.", ROBOT_EN),
    ("zh_empty_prediction", "", ROBOT_ZH),
    ("en_empty_prediction", "", ROBOT_EN),
    ("whitespace_prediction", "  \n ", ROBOT_ZH),
    ("zh_repeated", "机器人机器人机器人机器人机器人机器人", ROBOT_ZH),
    ("en_repeated", "robot robot robot robot robot robot robot", ROBOT_EN),
    ("zh_short", "机器人", "这是一个机器人。"),
    ("en_short", "a robot", "a red robot"),
    ("single_char", "我", "我"),
    ("zh_punctuation", "机器人！是白色的？对。。好的……真的......嗯“好”。", "机器人是白色的。"),
    ("zh_quotes", "他说：“这是机器人。”然后走了。", "他说：“这是机器人。”"),
    ("en_punctuation", "Robot?! It's white... (maybe) -- with 2 arms; wheels: yes.", "The robot is white, with two arms and wheels."),
    ("mixed_zh_en", "这是一个blue的robot，有2只arms和wheels。", "这是一个蓝色的机器人，有两只机械臂和轮子。"),
    ("numbers_percent", "准确率是95.5%，速度3.14倍，版本v2.0", "准确率为95.5%，速度是3.14倍"),
    ("newlines", "第一行：红色机器人\n第二行：圆形头部\n\n第三行", "红色机器人\n圆形头部"),
    ("think_block", "<think>\n\n</think>\n\n这是一个白色的服务机器人。", "这是一个白色的服务机器人。"),
    ("no_overlap_zh", "今天天气很好", "机器人有四条腿"),
    ("no_overlap_en", "sunny weather today", "robot with four legs"),
    ("unknown_words_hmm", "小明硕士毕业于中国科学院计算所，后在日本京都大学深造", "小明毕业于中国科学院计算所"),
    ("rare_names", "履带式巡检机器人在变电站巡逻", "轮式巡检机器人在仓库搬运货物"),
    ("en_case", "The Robot Is RED", "the robot is red"),
    ("long_repetition", "它有两只机械臂，" * 12, ROBOT_ZH),
    # Where jieba-rs departs from Python jieba 0.42 (alphanumerics joined by . _ -, rare CJK blocks).
    ("en_hyphens", "A dome-shaped, well-known robot: v1.2.3, OPENSSL_1_1_1, abc.def, 1.5.6%, a-5%, x-.", ROBOT_EN),
    ("rare_cjk", "㐀㐁机器人\u9fef很好，鿿还有\U00020000字\r\n结束", "机器人很好"),
]


class StubTokenizer:
    """Decodes row [i] to the i-th string: the metric code then sees exactly our texts."""

    pad_token_id = 0

    def __init__(self, texts):
        self.texts = texts

    def batch_decode(self, ids, skip_special_tokens=True):
        return [self.texts[int(row[0])] for row in ids]


def main():
    import jieba
    from transformers import EvalPrediction

    from llamafactory.train.sft.metric import ComputeSimilarity

    jieba.setLogLevel(60)
    preds = [p for _, p, _ in PAIRS]
    labels = [l for _, _, l in PAIRS]
    texts = preds + labels
    n = len(PAIRS)
    pred_ids = np.arange(n).reshape(n, 1)
    label_ids = np.arange(n, 2 * n).reshape(n, 1)
    metric = ComputeSimilarity(tokenizer=StubTokenizer(texts))
    metric(EvalPrediction(predictions=pred_ids, label_ids=label_ids), compute_result=False)
    per_sample = {k: list(v) for k, v in metric.score_dict.items()}
    corpus = metric._dump()

    out = {
        "versions": {p: version(p) for p in ["llamafactory", "jieba", "nltk", "rouge-chinese", "numpy"]},
        "pairs": [
            {
                "name": name,
                "predict": p,
                "label": l,
                "predict_cut": list(jieba.cut(p)),
                "label_cut": list(jieba.cut(l)),
                "scores": {k: float(per_sample[k][i]) for k in per_sample},
            }
            for i, (name, p, l) in enumerate(PAIRS)
        ],
        "corpus": {k: float(v) for k, v in corpus.items()},
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {n} pairs, corpus {out['corpus']}")


if __name__ == "__main__":
    main()
