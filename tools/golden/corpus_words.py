"""Sentences for training the tiny tokenizer: the vocabulary of robot descriptions and generic scene captions,
in Chinese and English, plus a little plain text and chat-style phrases."""

COLORS_ZH = ["红色", "蓝色", "绿色", "黄色", "白色", "黑色", "橙色", "紫色", "灰色", "银色", "粉色", "棕色"]
COLORS_EN = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "silver", "pink",
             "brown"]
SHAPES_ZH = ["圆形", "方形", "三角形", "星形", "椭圆形", "菱形", "长方形", "六边形"]
SHAPES_EN = ["circle", "square", "triangle", "star", "ellipse", "diamond", "rectangle", "hexagon"]
PLACES_ZH = ["左上角", "右上角", "左下角", "右下角", "中间", "上方", "下方", "左侧", "右侧"]
PLACES_EN = ["top left", "top right", "bottom left", "bottom right", "center", "top", "bottom", "left", "right"]
HEADS_ZH = ["圆形的头部", "方形的头部", "三角形的头部", "圆顶形的头部"]
HEADS_EN = ["a round head", "a square head", "a triangular head", "a dome-shaped head"]
ARMS_ZH = ["没有手臂", "一只机械臂", "两只机械臂", "四只机械臂"]
ARMS_EN = ["no arms", "one mechanical arm", "two mechanical arms", "four mechanical arms"]
GRIP_ZH = ["夹爪", "钩子", "圆形的手", "吸盘"]
GRIP_EN = ["grippers", "hooks", "round hands", "suction cups"]
MOVE_ZH = ["轮子", "履带", "两条腿", "四条腿"]
MOVE_EN = ["wheels", "tracks", "two legs", "four legs"]
EXTRA_ZH = ["胸前有一块屏幕", "头顶有一根天线", "眼睛是发光的", "身上有指示灯", "背景是蓝天", "背景是工厂",
            "背景是草地", "背景是室内"]
EXTRA_EN = ["a screen on its chest", "an antenna on its head", "glowing eyes", "indicator lights on its body",
            "a sky background", "a factory background", "a grass background", "an indoor background"]
KINDS_ZH = ["服务机器人", "工业机器人", "家用机器人", "巡逻机器人", "送餐机器人", "玩具机器人"]
KINDS_EN = ["service robot", "industrial robot", "household robot", "patrol robot", "delivery robot", "toy robot"]
PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Please describe the picture in detail.",
    "What is shown in this image? Answer in one sentence.",
    "You are a helpful assistant.",
    "请识别并描述图片中的机器人及其特征",
    "请描述这张图片。",
    "图片中有什么？",
    "这是一张合成的图片，画面里有几个简单的图形。",
    "I don't know, but I'll try: it's a test, isn't it?",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14",
    "def main():\n    print('hello world')\n",
    "机器学习模型需要数据、算力和耐心。",
    "今天天气很好，我们去公园散步吧。",
]


def robot_zh(rng):
    c, k = rng.choice(COLORS_ZH), rng.choice(KINDS_ZH)
    return (f"这是一个{c}的{k}，它有{rng.choice(HEADS_ZH)}，{rng.choice(ARMS_ZH)}，手上是{rng.choice(GRIP_ZH)}，"
            f"靠{rng.choice(MOVE_ZH)}移动，{rng.choice(EXTRA_ZH)}。")


def robot_en(rng):
    return (f"This is a {rng.choice(COLORS_EN)} {rng.choice(KINDS_EN)} with {rng.choice(HEADS_EN)}, "
            f"{rng.choice(ARMS_EN)} ending in {rng.choice(GRIP_EN)}, moving on {rng.choice(MOVE_EN)}, "
            f"with {rng.choice(EXTRA_EN)}.")


def scene_zh(rng):
    n = rng.randint(1, 3)
    parts = [f"{rng.choice(PLACES_ZH)}有一个{rng.choice(COLORS_ZH)}的{rng.choice(SHAPES_ZH)}" for _ in range(n)]
    return "图片中" + "，".join(parts) + "。"


def scene_en(rng):
    n = rng.randint(1, 3)
    parts = [f"a {rng.choice(COLORS_EN)} {rng.choice(SHAPES_EN)} at the {rng.choice(PLACES_EN)}" for _ in range(n)]
    return "The picture shows " + ", ".join(parts) + "."


def sentences(rng, n):
    makers = [robot_zh, robot_en, scene_zh, scene_en]
    out = [rng.choice(makers)(rng) for _ in range(n)]
    out += PROSE * 20
    return out
