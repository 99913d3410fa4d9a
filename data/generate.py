"""Write every dataset of the course from one small, consistent knowledge table.

All data in `data/` is synthetic and produced by this script. Each dataset has its own
`random.Random(seed)`, so running the script again gives byte-identical files, and changing one
dataset leaves the others untouched.

    python data/generate.py            # (re)write the files under data/
    python data/generate.py --check    # regenerate into a temporary folder and compare;
                                       # exit status 1 and the name of the first differing file
    python data/generate.py --out DIR  # write somewhere else

dataset_info.json also registers the seeds' real datasets (REAL_DATASET_INFO: Hub ids, column maps, licences,
local stand-ins), which are not files here. A learner's own entries belong in data/my_datasets.json, which
this script never writes and --check never compares (helpers.data reads both).

The knowledge table (symptom -> department, drug -> use, test -> what it measures, a bilingual
word list, small-number arithmetic) feeds both the pretraining corpus (declarative prose, no
instruction format) and the fine-tuning sets (instructions, chats, preference pairs), so a model
pretrained on the corpus already "knows" the facts that fine-tuning later asks about.
"""
from __future__ import annotations

import argparse
import filecmp
import itertools
import json
import random
import sys
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# The knowledge table
# ---------------------------------------------------------------------------------------------

# department key -> (Chinese name, English name). The names are the checkable answers.
DEPARTMENTS = {
    "resp": ("呼吸内科", "respiratory medicine"),
    "cardio": ("心内科", "cardiology"),
    "gastro": ("消化内科", "gastroenterology"),
    "neuro": ("神经内科", "neurology"),
    "derm": ("皮肤科", "dermatology"),
    "dent": ("口腔科", "dentistry"),
    "eye": ("眼科", "ophthalmology"),
    "ent": ("耳鼻喉科", "ENT"),
    "ortho": ("骨科", "orthopedics"),
    "infect": ("感染科", "infectious diseases"),
    "uro": ("泌尿外科", "urology"),
    "rheum": ("风湿免疫科", "rheumatology"),
    "psych": ("精神心理科", "psychiatry"),
    "gyn": ("妇科", "gynecology"),
    "endo": ("内分泌科", "endocrinology"),
}

# drug key -> (Chinese name, English name, Chinese use, English use)
DRUGS = {
    "aspirin": ("阿司匹林", "aspirin", "预防血栓和缓解疼痛", "prevent blood clots and relieve pain"),
    "metformin": ("二甲双胍", "metformin", "降低血糖", "lower blood sugar"),
    "insulin": ("胰岛素", "insulin", "控制血糖", "control blood sugar"),
    "warfarin": ("华法林", "warfarin", "抗凝和预防血栓", "thin the blood and prevent clots"),
    "ibuprofen": ("布洛芬", "ibuprofen", "止痛和消炎", "relieve pain and inflammation"),
    "amoxicillin": ("阿莫西林", "amoxicillin", "治疗细菌感染", "treat bacterial infections"),
    "loratadine": ("氯雷他定", "loratadine", "缓解过敏引起的瘙痒和皮疹", "relieve itching and rashes caused by allergies"),
    "omeprazole": ("奥美拉唑", "omeprazole", "抑制胃酸", "reduce stomach acid"),
    "nifedipine": ("硝苯地平", "nifedipine", "降低血压", "lower blood pressure"),
    "salbutamol": ("沙丁胺醇", "salbutamol", "缓解哮喘和气喘", "relieve asthma and wheezing"),
    "atorvastatin": ("阿托伐他汀", "atorvastatin", "降低血脂", "lower cholesterol"),
    "paracetamol": ("对乙酰氨基酚", "paracetamol", "退烧和止痛", "bring down a fever and ease pain"),
}

# test key -> (Chinese name, English name, Chinese: what it measures, English: what it measures)
TESTS = {
    "cbc": ("血常规", "complete blood count", "红细胞、白细胞和血小板的数量", "the numbers of red cells, white cells and platelets"),
    "fpg": ("空腹血糖", "fasting blood glucose test", "空腹时血液里葡萄糖的浓度", "the sugar level in the blood after fasting"),
    "hba1c": ("糖化血红蛋白", "HbA1c test", "过去两到三个月的平均血糖", "the average blood sugar over the past two to three months"),
    "lft": ("肝功能", "liver function test", "转氨酶和胆红素", "liver enzymes and bilirubin"),
    "rft": ("肾功能", "kidney function test", "肌酐和尿素氮", "creatinine and urea"),
    "ecg": ("心电图", "electrocardiogram", "心脏的电活动", "the electrical activity of the heart"),
    "cxr": ("胸部X光", "chest X-ray", "肺和心脏的影像", "pictures of the lungs and the heart"),
    "lipid": ("血脂", "lipid panel", "胆固醇和甘油三酯", "cholesterol and triglycerides"),
    "ua": ("尿常规", "urine test", "尿液里的蛋白、糖和细胞", "protein, sugar and cells in the urine"),
    "gastroscopy": ("胃镜", "gastroscopy", "食管和胃的黏膜", "the lining of the gullet and the stomach"),
    "eyeexam": ("视力检查", "eye test", "看清远近物体的能力", "how sharply the eyes can see"),
    "xray": ("X光片", "X-ray", "骨头和关节的影像", "pictures of bones and joints"),
}

# (Chinese noun form, Chinese spoken form, English, department, drug or None, test or None)
SYMPTOMS = [
    ("咳嗽", "咳嗽", "a cough", "resp", None, "cxr"),
    ("气喘", "喘不上气", "shortness of breath", "resp", "salbutamol", "cxr"),
    ("胸闷", "胸闷", "chest tightness", "cardio", None, "ecg"),
    ("心悸", "心慌", "palpitations", "cardio", None, "ecg"),
    ("胃痛", "胃痛", "a stomach ache", "gastro", "omeprazole", "gastroscopy"),
    ("腹泻", "拉肚子", "diarrhea", "gastro", None, "cbc"),
    ("便血", "大便带血", "blood in the stool", "gastro", None, "gastroscopy"),
    ("头痛", "头痛", "a headache", "neuro", "ibuprofen", None),
    ("头晕", "头晕", "dizziness", "neuro", None, None),
    ("皮疹", "身上起疹子", "a skin rash", "derm", "loratadine", None),
    ("皮肤瘙痒", "皮肤发痒", "itchy skin", "derm", "loratadine", None),
    ("牙痛", "牙疼", "a toothache", "dent", None, None),
    ("口腔溃疡", "嘴里长溃疡", "mouth ulcers", "dent", None, None),
    ("视力模糊", "看东西模糊", "blurred vision", "eye", None, "eyeexam"),
    ("眼睛红肿", "眼睛又红又肿", "red, swollen eyes", "eye", None, None),
    ("耳鸣", "耳朵里嗡嗡响", "ringing in the ears", "ent", None, None),
    ("咽喉痛", "嗓子疼", "a sore throat", "ent", None, None),
    ("鼻塞", "鼻子不通气", "a blocked nose", "ent", None, None),
    ("腰痛", "腰疼", "back pain", "ortho", "ibuprofen", "xray"),
    ("发热", "发烧", "a fever", "infect", "paracetamol", "cbc"),
    ("尿频", "小便次数多", "frequent urination", "uro", None, "ua"),
    ("关节肿痛", "关节又肿又痛", "swollen, painful joints", "rheum", None, "cbc"),
    ("失眠", "睡不着觉", "insomnia", "psych", None, None),
    ("月经不调", "月经不规律", "irregular periods", "gyn", None, None),
    ("血糖偏高", "血糖偏高", "high blood sugar", "endo", "metformin", "hba1c"),
]

# (Chinese, English) -- the bilingual word list used by the corpus and the translation tasks.
DICTIONARY = [
    ("苹果", "apple"), ("水", "water"), ("书", "book"), ("猫", "cat"), ("狗", "dog"),
    ("医生", "doctor"), ("医院", "hospital"), ("老师", "teacher"), ("学生", "student"),
    ("朋友", "friend"), ("太阳", "sun"), ("月亮", "moon"), ("米饭", "rice"), ("面包", "bread"),
    ("牛奶", "milk"), ("茶", "tea"), ("咖啡", "coffee"), ("鸡蛋", "egg"), ("鱼", "fish"),
    ("鸟", "bird"), ("花", "flower"), ("树", "tree"), ("山", "mountain"), ("河", "river"),
    ("海", "sea"), ("雨", "rain"), ("雪", "snow"), ("风", "wind"), ("火", "fire"), ("门", "door"),
    ("窗户", "window"), ("桌子", "table"), ("椅子", "chair"), ("汽车", "car"), ("飞机", "airplane"),
    ("火车", "train"), ("城市", "city"), ("学校", "school"), ("家", "home"), ("手", "hand"),
    ("眼睛", "eye"), ("耳朵", "ear"), ("心脏", "heart"), ("头", "head"), ("脚", "foot"),
    ("药", "medicine"), ("病人", "patient"), ("护士", "nurse"), ("红色", "red"), ("蓝色", "blue"),
    ("绿色", "green"), ("白色", "white"), ("黑色", "black"), ("大", "big"), ("小", "small"),
    ("快", "fast"), ("慢", "slow"), ("热", "hot"), ("冷", "cold"), ("早上", "morning"),
    ("晚上", "evening"), ("今天", "today"), ("明天", "tomorrow"), ("昨天", "yesterday"),
    ("星期", "week"), ("年", "year"), ("钱", "money"), ("衣服", "clothes"), ("鞋", "shoe"),
    ("电脑", "computer"), ("手机", "phone"), ("音乐", "music"), ("电影", "film"),
    ("图书馆", "library"), ("厨房", "kitchen"), ("公园", "park"), ("天气", "weather"),
    ("时间", "time"), ("爸爸", "father"), ("妈妈", "mother"),
]

ZH_NAMES = [("张先生", "他"), ("李女士", "她"), ("王阿姨", "她"), ("刘大爷", "他"), ("陈同学", "他"),
            ("赵女士", "她"), ("孙先生", "他"), ("周阿姨", "她"), ("吴先生", "他"), ("郑女士", "她"),
            ("小林", "他"), ("小王", "她")]
EN_NAMES = [("Mr. Zhang", "he", "him"), ("Ms. Li", "she", "her"), ("Tom", "he", "him"),
            ("Anna", "she", "her"), ("David", "he", "him"), ("Mary", "she", "her"),
            ("Mrs. Chen", "she", "her"), ("Peter", "he", "him"), ("Lucy", "she", "her")]
ZH_DURATIONS = ["两天", "三天", "一周", "半个月", "一个多月", "好几天"]
EN_DURATIONS = ["two days", "three days", "a week", "two weeks", "a month", "several days"]

_EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
            "eighteen", "nineteen"]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ZH_DIGITS = "零一二三四五六七八九"


def en_number(n: int) -> str:
    """English words for 0..99."""
    if n < 20:
        return _EN_ONES[n]
    tens, ones = divmod(n, 10)
    return _EN_TENS[tens] + ("" if ones == 0 else "-" + _EN_ONES[ones])


def zh_number(n: int) -> str:
    """Chinese numerals for 0..99."""
    if n < 10:
        return _ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "十" if tens == 1 else _ZH_DIGITS[tens] + "十"
    return head + ("" if ones == 0 else _ZH_DIGITS[ones])


def a_an(noun: str) -> str:
    """'a test' / 'an eye test' (good enough for the nouns used here)."""
    return ("an " if noun[:1].lower() in "aeiou" or noun.startswith(("HbA1c", "X-")) else "a ") + noun


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------
# CHIP-CTC style eligibility criteria: each label has a keyword family, so the label follows
# from the sentence.
# ---------------------------------------------------------------------------------------------

CTC_LABELS = ["疾病", "年龄", "性别", "怀孕相关", "过敏耐受", "药物", "实验室检查", "治疗或手术", "知情同意", "吸烟状况"]
CTC_SIZES = {"train": 600, "dev": 110, "test": 106}
CTC_INSTRUCTIONS = [
    "判断临床试验筛选标准的类别：\n{sentence}\n选项：{choices}\n答：",
    "以下是一条临床试验的筛选标准，请指出它属于哪一类。\n{sentence}\n选项：{choices}\n答：",
    "请对下面这条临床试验入组或排除条件进行分类。\n{sentence}\n选项：{choices}\n答：",
]

_POP = ["患者", "受试者", "志愿者", "住院患者", "门诊患者", "健康受试者"]
_DISEASES = ["2型糖尿病", "高血压", "冠心病", "慢性阻塞性肺疾病", "类风湿关节炎", "慢性肾病", "胃溃疡",
             "支气管哮喘", "肝硬化", "帕金森病", "抑郁症", "脑卒中"]
_CTC_DRUGS = ["阿司匹林", "华法林", "二甲双胍", "胰岛素", "布洛芬", "阿莫西林", "氯吡格雷", "糖皮质激素",
              "免疫抑制剂", "他汀类药物"]
_ALLERGENS = ["青霉素", "头孢类抗生素", "碘造影剂", "阿司匹林", "磺胺类药物", "研究药物", "布洛芬", "乳胶"]
_LABS = ["血红蛋白", "白细胞计数", "血小板计数", "谷丙转氨酶", "谷草转氨酶", "血肌酐", "总胆红素",
         "中性粒细胞计数", "血钾", "糖化血红蛋白"]
_SURGERIES = ["冠状动脉搭桥术", "胃切除术", "器官移植手术", "关节置换手术", "心脏介入手术", "肝切除术",
              "脊柱手术", "白内障手术"]
_THERAPIES = ["放疗", "化疗", "免疫治疗", "靶向治疗", "血液透析", "干细胞治疗"]
_NUM_SHORT = ["1", "2", "3", "4", "6", "8", "12"]


def _fill(template: str, **slots: list[str]) -> list[str]:
    """Every way of filling `template`'s slots (slot name -> list of values), in a fixed order."""
    names = [n for n in slots if "{" + n + "}" in template]
    out = []
    for values in itertools.product(*(slots[n] for n in names)):
        out.append(template.format(**dict(zip(names, values))))
    return out


def ctc_pool() -> dict[str, list[str]]:
    """All eligibility sentences the templates can make, per label, deduplicated, fixed order."""
    ages_lo = ["16", "18", "20", "25", "30", "35", "40", "45", "50"]
    ages_hi = ["55", "60", "65", "70", "75", "80"]
    sexes = ["男性", "女性"]
    periods = ["妊娠期", "哺乳期", "孕早期", "孕中期", "备孕期", "产后6个月内"]
    months = ["3", "6", "12", "24"]
    who = ["患者本人", "受试者", "患者或其法定代理人", "患者及其家属", "法定监护人", "志愿者本人",
           "受试者或其监护人"]
    spec = {
        "疾病": [
            ("确诊为{d}的{p}", dict(d=_DISEASES, p=_POP)),
            ("既往有{d}病史", dict(d=_DISEASES)),
            ("合并严重{d}者", dict(d=_DISEASES)),
            ("符合{d}诊断标准的{p}", dict(d=_DISEASES, p=_POP)),
            ("患有未控制的{d}", dict(d=_DISEASES)),
            ("伴有{d}且病情不稳定", dict(d=_DISEASES)),
            ("经临床诊断为{d}", dict(d=_DISEASES)),
        ],
        "年龄": [
            ("年龄{a}至{b}岁", dict(a=ages_lo, b=ages_hi)),
            ("年龄在{a}岁到{b}岁之间的{p}", dict(a=ages_lo, b=ages_hi, p=_POP)),
            ("年龄≥{a}岁", dict(a=ages_lo)),
            ("{a}岁以上的成年{p}", dict(a=ages_lo, p=_POP)),
            ("年龄小于{b}岁", dict(b=ages_hi)),
            ("入组时年龄不超过{b}周岁", dict(b=ages_hi)),
            ("年龄大于{a}岁且小于{b}岁", dict(a=ages_lo, b=ages_hi)),
        ],
        "性别": [
            ("{s}{p}", dict(s=sexes, p=_POP)),
            ("仅限{s}{p}", dict(s=sexes, p=_POP)),
            ("性别为{s}", dict(s=sexes)),
            ("受试者须为{s}", dict(s=sexes)),
            ("只招募{s}{p}", dict(s=sexes, p=_POP)),
            ("{p}性别不限", dict(p=_POP)),
            ("男女不限的{p}", dict(p=_POP)),
            ("本试验只纳入{s}", dict(s=sexes)),
            ("{p}的性别须为{s}", dict(s=sexes, p=_POP)),
            ("入选对象为{s}{p}", dict(s=sexes, p=_POP)),
            ("拟招募的{p}须为{s}", dict(s=sexes, p=_POP)),
            ("不限性别的{p}", dict(p=_POP)),
        ],
        "怀孕相关": [
            ("处于{t}的女性", dict(t=periods)),
            ("{t}妇女", dict(t=periods)),
            ("研究期间计划怀孕的{p}", dict(p=_POP)),
            ("试验结束后{m}个月内有生育计划者", dict(m=months)),
            ("育龄女性妊娠试验阳性", {}),
            ("不愿在试验期间采取有效避孕措施的{p}", dict(p=_POP)),
            ("近{m}个月内有怀孕计划的{s}{p}", dict(m=months, s=sexes, p=_POP)),
            ("正在怀孕或哺乳的{p}", dict(p=_POP)),
            ("{t}或计划在{m}个月内怀孕的女性", dict(t=periods, m=months)),
        ],
        "过敏耐受": [
            ("对{x}过敏者", dict(x=_ALLERGENS)),
            ("已知对{x}或其辅料过敏", dict(x=_ALLERGENS)),
            ("有{x}过敏史的{p}", dict(x=_ALLERGENS, p=_POP)),
            ("对{x}有严重过敏反应", dict(x=_ALLERGENS)),
            ("过敏体质或对{x}不耐受", dict(x=_ALLERGENS)),
            ("既往对{x}发生过敏", dict(x=_ALLERGENS)),
            ("不能耐受{x}的{p}", dict(x=_ALLERGENS, p=_POP)),
        ],
        "药物": [
            ("入组前{n}周内使用过{x}", dict(n=_NUM_SHORT, x=_CTC_DRUGS)),
            ("正在服用{x}的{p}", dict(x=_CTC_DRUGS, p=_POP)),
            ("需要长期使用{x}者", dict(x=_CTC_DRUGS)),
            ("筛选前{m}个月内用过{x}", dict(m=months, x=_CTC_DRUGS)),
            ("试验期间需合并使用{x}", dict(x=_CTC_DRUGS)),
            ("长期口服{x}的{p}", dict(x=_CTC_DRUGS, p=_POP)),
            ("近{n}周内服用{x}等药物", dict(n=_NUM_SHORT, x=_CTC_DRUGS)),
        ],
        "实验室检查": [
            ("{l}低于正常值下限", dict(l=_LABS)),
            ("{l}高于正常值上限{k}倍", dict(l=_LABS, k=["1.5", "2", "2.5", "3", "5"])),
            ("筛选时{l}检测结果异常", dict(l=_LABS)),
            ("{l}≥{k}×ULN", dict(l=_LABS, k=["1.5", "2", "2.5", "3", "5"])),
            ("实验室检查显示{l}明显升高", dict(l=_LABS)),
            ("化验{l}不在正常范围内", dict(l=_LABS)),
            ("血液检查{l}偏低", dict(l=_LABS)),
        ],
        "治疗或手术": [
            ("入组前{m}个月内接受过{s}", dict(m=months, s=_SURGERIES)),
            ("既往行{s}的{p}", dict(s=_SURGERIES, p=_POP)),
            ("计划在研究期间进行{s}", dict(s=_SURGERIES)),
            ("曾接受{t}", dict(t=_THERAPIES)),
            ("{n}周内接受过{t}", dict(n=_NUM_SHORT, t=_THERAPIES)),
            ("近期行{s}且尚未恢复", dict(s=_SURGERIES)),
            ("正在进行{t}的{p}", dict(t=_THERAPIES, p=_POP)),
        ],
        "知情同意": [
            ("{w}签署知情同意书", dict(w=who)),
            ("自愿参加本研究并签署知情同意书的{p}", dict(p=_POP)),
            ("能够理解并{v}知情同意书", dict(v=["签署", "书面签署", "签字确认", "阅读并签署"])),
            ("{w}同意参加试验并签署书面知情同意", dict(w=who)),
            ("不愿签署知情同意书的{p}", dict(p=_POP)),
            ("{w}已充分了解研究内容并自愿签署知情同意书", dict(w=who)),
            ("无法提供知情同意的{p}", dict(p=_POP)),
            ("愿意配合随访并签署知情同意书的{p}", dict(p=_POP)),
            ("经充分告知后{w}自愿签署知情同意书", dict(w=who)),
            ("{w}在入组前{n}天内签署知情同意书", dict(w=who, n=["3", "7", "14"])),
            ("{p}及其家属知晓试验风险并签署知情同意书", dict(p=_POP)),
            ("签署知情同意书前已知晓研究的{x}", dict(x=["目的", "风险", "流程", "获益与风险"])),
            ("{w}在研究期间撤回知情同意", dict(w=who)),
        ],
        "吸烟状况": [
            ("目前吸烟或戒烟不足{m}个月者", dict(m=months)),
            ("每日吸烟{n}支以上", dict(n=["5", "10", "15", "20", "30"])),
            ("有{n}年以上吸烟史的{p}", dict(n=["5", "10", "15", "20", "30"], p=_POP)),
            ("吸烟指数大于{n}包年", dict(n=["5", "10", "15", "20", "30"])),
            ("从不吸烟的{p}", dict(p=_POP)),
            ("筛选前{m}个月内仍在吸烟的{p}", dict(m=months, p=_POP)),
            ("试验期间不能戒烟者", {}),
            ("{p}目前每天吸烟", dict(p=_POP)),
            ("戒烟时间少于{m}个月的{p}", dict(m=months, p=_POP)),
        ],
    }
    pool = {}
    for label in CTC_LABELS:
        seen: dict[str, None] = {}
        for template, slots in spec[label]:
            for sentence in _fill(template, **slots):
                seen.setdefault(sentence, None)
        pool[label] = list(seen)
    return pool


def ctc_splits(seed: int = 1001) -> dict[str, list[dict]]:
    """Disjoint train/dev/test splits of the CTC task in PromptCBLUE's record format.

    Stratified: every split holds each label (nearly) equally often.
    """
    rng = random.Random(seed)
    pool = ctc_pool()
    n = len(CTC_LABELS)
    quota = {split: [size // n + (1 if i < size % n else 0) for i in range(n)] for split, size in CTC_SIZES.items()}
    chosen = {split: [] for split in CTC_SIZES}
    for i, label in enumerate(CTC_LABELS):
        sentences = rng.sample(pool[label], sum(q[i] for q in quota.values()))
        for split in CTC_SIZES:
            take, sentences = sentences[:quota[split][i]], sentences[quota[split][i]:]
            chosen[split] += [(sentence, label) for sentence in take]
    choices = "，".join(CTC_LABELS)
    splits = {}
    for split, items in chosen.items():
        rng.shuffle(items)
        rows = []
        for i, (sentence, label) in enumerate(items, 1):
            prompt = rng.choice(CTC_INSTRUCTIONS).format(sentence=sentence, choices=choices)
            rows.append({"input": prompt, "target": label, "answer_choices": list(CTC_LABELS),
                         "type": "cls", "task_dataset": "CHIP-CTC", "sample_id": f"{split}-{i:04d}"})
        splits[split] = rows
    return splits


def ctc_sentence(row: dict) -> str:
    """The criterion sentence inside a CTC prompt (the line between instruction and options)."""
    return row["input"].split("\n")[1]


# ---------------------------------------------------------------------------------------------
# Pretraining corpus: declarative prose only (no instruction, option list or answer format)
# ---------------------------------------------------------------------------------------------

CORPUS_BYTES = 2_500_000
CORPUS_ZH_SHARE = 0.6

_DESIGNS_ZH = ["随机对照", "多中心", "开放标签", "双盲安慰剂对照", "单臂", "前瞻性观察性"]
_DESIGNS_EN = ["randomised controlled", "multicentre", "open-label", "double-blind placebo-controlled",
               "single-arm", "prospective observational"]
_DISEASES_EN = ["type 2 diabetes", "high blood pressure", "coronary heart disease", "COPD",
                "rheumatoid arthritis", "chronic kidney disease", "stomach ulcers", "asthma",
                "cirrhosis of the liver", "Parkinson's disease", "depression", "stroke"]


def _en_criteria(rng: random.Random) -> str:
    lo, hi = rng.choice(["16", "18", "20", "30", "40"]), rng.choice(["60", "65", "70", "75"])
    drug = rng.choice(list(DRUGS.values()))[1]
    options = [
        f"patients aged {lo} to {hi} years are eligible",
        f"participants must be at least {lo} years old",
        f"only {rng.choice(['men', 'women'])} are enrolled",
        "both men and women may take part",
        f"people with a diagnosis of {rng.choice(_DISEASES_EN)} are included",
        f"people with a history of {rng.choice(_DISEASES_EN)} are excluded",
        "women who are pregnant or breastfeeding are excluded",
        f"women who plan a pregnancy within {rng.choice(['3', '6', '12'])} months are excluded",
        f"anyone allergic to {rng.choice(['penicillin', 'iodine contrast', drug])} is excluded",
        f"patients who have taken {drug} in the last {rng.choice(['two', 'four', 'eight'])} weeks are excluded",
        f"a {rng.choice(['haemoglobin', 'platelet count', 'creatinine', 'bilirubin'])} value outside the normal range leads to exclusion",
        f"patients who had {rng.choice(['heart surgery', 'an organ transplant', 'chemotherapy', 'radiotherapy'])} in the past year are excluded",
        "every participant signs an informed consent form",
        f"current smokers and those who quit less than {rng.choice(['three', 'six', 'twelve'])} months ago are excluded",
        "only people who have never smoked are enrolled",
    ]
    return "; ".join(rng.sample(options, rng.randint(3, 5)))


def corpus_documents(seed: int = 2001) -> list[str]:
    """Documents of the pretraining corpus, one string per line, about CORPUS_BYTES in all."""
    rng = random.Random(seed)
    splits = ctc_splits()
    held_out = sorted({ctc_sentence(r) for s in ("dev", "test") for r in splits[s]})
    pool = ctc_pool()
    usable = {label: [s for s in sentences if not any(h in s for h in held_out)]
              for label, sentences in pool.items()}
    symptoms = SYMPTOMS
    dept = DEPARTMENTS
    drugs = list(DRUGS.values())
    tests = list(TESTS.values())

    def zh_trial() -> str:
        disease = rng.choice(_DISEASES)
        intro = rng.choice([
            f"这是一项评估{rng.choice(_CTC_DRUGS)}用于{disease}患者的{rng.choice(_DESIGNS_ZH)}研究，计划在{rng.randint(3, 30)}家医院招募{rng.choice([60, 120, 200, 300, 480])}名受试者。",
            f"本研究是一项针对{disease}的{rng.choice(_DESIGNS_ZH)}临床试验。",
            f"{rng.randint(2015, 2024)}年启动的这项试验旨在观察{rng.choice(_THERAPIES)}对{disease}患者的影响。",
            f"研究团队希望了解{disease}患者在{rng.choice(['十二周', '半年', '一年', '两年'])}内的病情变化。",
        ])
        labels = rng.sample(CTC_LABELS, rng.randint(3, 5))
        crit = "；".join(rng.choice(usable[label]) for label in labels)
        lead = rng.choice(["研究方案对受试者规定了如下条件：", "该试验的筛选标准涉及以下几条：",
                           "招募时，研究者会逐条核对：", "方案中写明的条件有："])
        tail = rng.choice(["", "符合条件的受试者将被随机分组。", "所有受试者都会接受定期随访。",
                           "研究结束后，结果将在学术会议上报告。"])
        if rng.random() < 0.4:
            lo, hi = rng.choice(["18", "20", "30"]), rng.choice(["60", "65", "70"])
            crit = f"本研究纳入年龄在{lo}至{hi}岁之间的患者；" + crit
        return intro + lead + crit + "。" + tail

    def en_trial() -> str:
        disease = rng.choice(_DISEASES_EN)
        intro = rng.choice([
            f"This {rng.choice(_DESIGNS_EN)} trial studies {rng.choice(drugs)[1]} in people with {disease}.",
            f"A {rng.choice(_DESIGNS_EN)} study of {disease} plans to enrol {rng.choice([60, 120, 200, 300])} participants at {rng.randint(3, 30)} hospitals.",
            f"The trial, started in {rng.randint(2015, 2024)}, follows patients with {disease} for {rng.choice(['twelve weeks', 'six months', 'one year', 'two years'])}.",
        ])
        return intro + " " + cap(_en_criteria(rng)) + "."

    def zh_symptom_facts() -> str:
        parts = []
        for s in rng.sample(symptoms, rng.randint(2, 4)):
            d = dept[s[3]][0]
            parts.append(rng.choice([
                f"出现{s[0]}的患者通常应该去{d}就诊。",
                f"如果{s[1]}，一般建议挂{d}。",
                f"在医院里，{s[0]}归{d}负责。",
                f"{d}的医生经常接诊{s[0]}的病人。",
                f"{s[0]}是{d}常见的就诊原因。",
            ]))
        if rng.random() < 0.3:
            k = rng.choice(list(dept))
            members = [s[0] for s in symptoms if s[3] == k]
            parts.append(f"{dept[k][0]}主要处理" + "、".join(members) + "等问题。")
        return "".join(parts)

    def en_symptom_facts() -> str:
        parts = []
        for s in rng.sample(symptoms, rng.randint(2, 4)):
            d = dept[s[3]][1]
            parts.append(rng.choice([
                f"People who have {s[2]} should usually go to the {d} department.",
                f"If you have {s[2]}, the department to visit is {d}.",
                f"In a hospital, {s[2]} is handled by {d}.",
                f"Doctors in {d} often see patients with {s[2]}.",
                f"{cap(s[2])} is a common reason to visit {d}.",
            ]))
        return " ".join(parts)

    def zh_drug_test_facts() -> str:
        parts = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.5:
                d = rng.choice(drugs)
                parts.append(rng.choice([f"{d[0]}是一种常用药，主要用于{d[2]}。", f"{d[0]}的作用是{d[2]}。",
                                         f"医生开{d[0]}，通常是为了{d[2]}。"]))
            else:
                t = rng.choice(tests)
                parts.append(rng.choice([f"{t[0]}检查的是{t[2]}。", f"做{t[0]}可以了解{t[2]}。",
                                         f"{t[0]}这项检查反映{t[2]}。"]))
        return "".join(parts)

    def en_drug_test_facts() -> str:
        parts = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.5:
                d = rng.choice(drugs)
                parts.append(rng.choice([f"{cap(d[1])} is a common medicine used to {d[3]}.",
                                         f"Doctors prescribe {d[1]} to {d[3]}.",
                                         f"The job of {d[1]} is to {d[3]}."]))
            else:
                t = rng.choice(tests)
                parts.append(rng.choice([f"{cap(a_an(t[1]))} measures {t[3]}.", f"The {t[1]} shows {t[3]}.",
                                         f"Doctors order {a_an(t[1])} to look at {t[3]}."]))
        return " ".join(parts)

    def add_pair() -> tuple[int, int]:
        return rng.randint(0, 20), rng.randint(0, 20)

    def sub_pair() -> tuple[int, int]:
        a = rng.randint(0, 40)
        return a, rng.randint(0, min(a, 20))

    def zh_arith() -> str:
        parts = []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.5:
                a, b = add_pair()
                c = a + b
                name = rng.choice(ZH_NAMES)[0]
                parts.append(rng.choice([
                    f"{a} 加 {b} 等于 {c}。", f"{a} + {b} = {c}。", f"{a} 和 {b} 的和是 {c}。",
                    f"{zh_number(a)}加{zh_number(b)}等于{zh_number(c)}。",
                    f"{name}有 {a} 个苹果，又买了 {b} 个，一共有 {c} 个。",
                ]))
            else:
                a, b = sub_pair()
                c = a - b
                name = rng.choice(ZH_NAMES)[0]
                parts.append(rng.choice([
                    f"{a} 减 {b} 等于 {c}。", f"{a} - {b} = {c}。", f"{a} 比 {b} 多 {c}。",
                    f"{zh_number(a)}减{zh_number(b)}等于{zh_number(c)}。",
                    f"{name}有 {a} 本书，送给朋友 {b} 本，还剩 {c} 本。",
                ]))
        return "".join(parts)

    def en_arith() -> str:
        parts = []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < 0.5:
                a, b = add_pair()
                c = a + b
                name = rng.choice(EN_NAMES)[0]
                parts.append(rng.choice([
                    f"{cap(en_number(a))} plus {en_number(b)} is {en_number(c)}.", f"{a} + {b} = {c}.",
                    f"The sum of {a} and {b} is {c}.", f"{a} plus {b} equals {c}.",
                    f"{name} has {a} apples and buys {b} more, so {name} has {c} apples.",
                ]))
            else:
                a, b = sub_pair()
                c = a - b
                name = rng.choice(EN_NAMES)[0]
                parts.append(rng.choice([
                    f"{cap(en_number(a))} minus {en_number(b)} is {en_number(c)}.", f"{a} - {b} = {c}.",
                    f"{a} minus {b} equals {c}.", f"Taking {b} away from {a} leaves {c}.",
                    f"{name} had {a} books and gave {b} to a friend, leaving {c} books.",
                ]))
        return " ".join(parts)

    def zh_dict() -> str:
        parts = []
        for zh, en in rng.sample(DICTIONARY, rng.randint(3, 6)):
            parts.append(rng.choice([f"“{zh}”的英文是 {en}。", f"{en} 的中文意思是“{zh}”。",
                                     f"英语里的 {en} 就是汉语里的“{zh}”。", f"“{zh}”用英语说是 {en}。"]))
        return "".join(parts)

    def en_dict() -> str:
        parts = []
        for zh, en in rng.sample(DICTIONARY, rng.randint(3, 6)):
            parts.append(rng.choice([f"The Chinese word for {en} is {zh}.", f"In Chinese, {en} is {zh}.",
                                     f"The English word {en} is {zh} in Chinese.",
                                     f"{zh} means {en} in English."]))
        return " ".join(parts)

    def zh_order() -> str:
        parts = []
        for _ in range(rng.randint(2, 4)):
            nums = rng.sample(range(0, 50), 3)
            s = sorted(nums)
            parts.append(rng.choice([
                f"{nums[0]}、{nums[1]} 和 {nums[2]} 从小到大排列是 {s[0]}、{s[1]}、{s[2]}。",
                f"{nums[0]}、{nums[1]}、{nums[2]} 这三个数里，最大的是 {s[2]}，最小的是 {s[0]}。",
                f"{nums[0]}、{nums[1]} 和 {nums[2]} 从大到小排列是 {s[2]}、{s[1]}、{s[0]}。",
            ]))
        return "".join(parts)

    def en_order() -> str:
        parts = []
        for _ in range(rng.randint(2, 4)):
            nums = rng.sample(range(0, 50), 3)
            s = sorted(nums)
            parts.append(rng.choice([
                f"From smallest to largest, {nums[0]}, {nums[1]} and {nums[2]} are {s[0]}, {s[1]}, {s[2]}.",
                f"Among {nums[0]}, {nums[1]} and {nums[2]}, the largest is {s[2]} and the smallest is {s[0]}.",
                f"From largest to smallest, {nums[0]}, {nums[1]} and {nums[2]} are {s[2]}, {s[1]}, {s[0]}.",
            ]))
        return " ".join(parts)

    def zh_story() -> str:
        name, p = rng.choice(ZH_NAMES)
        s = rng.choice(symptoms)
        d = dept[s[3]][0]
        dur = rng.choice(ZH_DURATIONS)
        text = rng.choice([
            f"{name}最近{dur}一直{s[1]}，心里有些担心，就来到了医院。在导诊台，{p}向护士说明了情况，护士告诉{p}，{s[0]}应该看{d}。",
            f"一位患者走进诊室，对医生说：“我这{dur}总是{s[1]}。”医生说，这种情况应该由{d}处理，并请{p}先到{d}挂号。",
            f"{name}给家人打电话说自己{dur}来{s[1]}。家人劝{p}别拖着，去医院挂{d}看看。第二天{p}就去了{d}。",
        ])
        if s[5] and rng.random() < 0.7:
            t = TESTS[s[5]]
            text += f"{d}的医生听完描述后，安排{p}做了{t[0]}，{t[0]}可以看出{t[2]}。"
        if s[4] and rng.random() < 0.7:
            dr = DRUGS[s[4]]
            text += f"医生给{p}开了{dr[0]}，并解释说{dr[0]}用于{dr[2]}，要按时服用。"
        if "医生" in text:
            text += rng.choice(["", f"过了{rng.choice(ZH_DURATIONS)}，{p}感觉好多了。", f"{p}谢过医生，回家休息去了。"])
        return text

    def en_story() -> str:
        name, p, obj = rng.choice(EN_NAMES)
        s = rng.choice(symptoms)
        d = dept[s[3]][1]
        dur = rng.choice(EN_DURATIONS)
        text = rng.choice([
            f"{name} had had {s[2]} for {dur} and decided to go to the hospital. At the front desk the nurse listened and said that {s[2]} belongs to {d}, so {p} went to the {d} department.",
            f"A patient came into the clinic and told the doctor, \"I have had {s[2]} for {dur}.\" The doctor explained that this is a problem for {d} and sent {obj} there.",
            f"{name} called home and said {p} had had {s[2]} for {dur}. The family told {obj} to see a doctor in {d}, and the next day {p} did.",
        ])
        if s[5] and rng.random() < 0.7:
            t = TESTS[s[5]]
            text += f" The doctor in {d} ordered {a_an(t[1])}, which shows {t[3]}."
        if s[4] and rng.random() < 0.7:
            dr = DRUGS[s[4]]
            text += f" The doctor prescribed {dr[1]} and explained that it is used to {dr[3]}."
        if "doctor" in text:
            text += rng.choice(["", f" After {rng.choice(EN_DURATIONS)}, {p} felt much better.",
                                f" {cap(p)} thanked the doctor and went home to rest."])
        return text

    def zh_criteria_kinds() -> str:
        # What a real corpus teaches about eligibility criteria: each one is *about* something. Written as
        # prose about sorting criteria (no option list, no question-and-answer format), from train-pool
        # sentences only; documents containing a dev/test sentence are dropped below.
        picks = [(label, rng.choice(usable[label])) for label in rng.sample(CTC_LABELS, rng.randint(2, 4))]
        parts = []
        for label, sentence in picks:
            parts.append(rng.choice([
                f"“{sentence}”是一条关于{label}的标准",
                f"“{sentence}”这一条属于{label}类",
                f"研究者把“{sentence}”归入{label}一类",
                f"判断“{sentence}”属于哪一类并不难，它讲的是{label}",
                f"有人问“{sentence}”算什么条件，回答是{label}",
            ]))
        lead = rng.choice(["整理筛选标准时，研究者会按类别归档：", "临床试验的入组和排除条件可以分成若干类别。",
                           "伦理委员会审阅方案时，会逐条看清每条标准涉及的方面。", ""])
        return lead + "；".join(parts) + "。"

    zh_kinds = [(zh_trial, 2.0), (zh_criteria_kinds, 1.5), (zh_symptom_facts, 2.0), (zh_drug_test_facts, 1.2), (zh_arith, 2.0),
                (zh_dict, 1.5), (zh_order, 0.6), (zh_story, 2.0)]
    en_kinds = [(en_trial, 1.2), (en_symptom_facts, 2.0), (en_drug_test_facts, 1.2), (en_arith, 2.0),
                (en_dict, 1.5), (en_order, 0.6), (en_story, 2.0)]
    docs: list[str] = []
    size = {"zh": 0, "en": 0}
    while size["zh"] + size["en"] < CORPUS_BYTES:
        # keep the share of Chinese characters' bytes near CORPUS_ZH_SHARE of the corpus
        lang = "zh" if size["zh"] <= CORPUS_ZH_SHARE * (size["zh"] + size["en"]) else "en"
        kinds = zh_kinds if lang == "zh" else en_kinds
        make = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        doc = make()
        if any(h in doc for h in held_out):  # never leak a dev/test criterion
            continue
        docs.append(doc)
        size[lang] += len(doc.encode("utf-8")) + 1
    return docs


# ---------------------------------------------------------------------------------------------
# Fine-tuning sets: the same task families as instructions, chats and preference pairs
# ---------------------------------------------------------------------------------------------

ZH_POLITE_OPEN = ["您好，", "好的，", "很高兴为您解答：", ""]
ZH_POLITE_CLOSE = ["希望对您有帮助。", "还有其他问题可以随时问我。", "祝您身体健康。", ""]
EN_POLITE_OPEN = ["Sure! ", "Happy to help. ", "Good question. ", ""]
EN_POLITE_CLOSE = [" I hope this helps.", " Let me know if you have other questions.", " Take care.", ""]


def _arith(rng: random.Random, op: str) -> tuple[int, int, int]:
    if op == "+":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return a, b, a + b
    a = rng.randint(1, 40)
    b = rng.randint(0, min(a, 20))
    return a, b, a - b


def _three(rng: random.Random) -> tuple[list[int], list[int]]:
    nums = rng.sample(range(0, 50), 3)
    return nums, sorted(nums)


def alpaca_task(rng: random.Random, lang: str, family: str) -> tuple[str, str, str, str]:
    """One (instruction, input, output, gold answer) of a task family, in Chinese or English."""
    zh = lang == "zh"
    if family in ("add", "sub"):
        op = "+" if family == "add" else "-"
        a, b, c = _arith(rng, op)
        word_zh, word_en = ("加", "plus") if op == "+" else ("减", "minus")
        name_zh = rng.choice(ZH_NAMES)[0]
        name_en = rng.choice(EN_NAMES)[0]
        if zh:
            forms = [(f"计算 {a} {word_zh} {b} 等于多少。", "", f"{a} {word_zh} {b} 等于 {c}。"),
                     ("请计算下面的算式。", f"{a} {op} {b}", f"{a} {op} {b} = {c}"),
                     (f"{a} {word_zh} {b} 是多少？", "", f"等于 {c}。")]
            if op == "+":
                forms.append((f"{name_zh}有 {a} 个苹果，又买了 {b} 个，现在一共有几个？", "", f"一共有 {c} 个苹果。"))
            else:
                forms.append((f"{name_zh}有 {a} 本书，送给朋友 {b} 本，还剩几本？", "", f"还剩 {c} 本。"))
        else:
            forms = [(f"What is {a} {word_en} {b}?", "", f"{a} {word_en} {b} is {c}."),
                     ("Calculate the following.", f"{a} {op} {b}", f"{a} {op} {b} = {c}"),
                     (f"Work out {a} {op} {b}.", "", f"The answer is {c}.")]
            if op == "+":
                forms.append((f"{name_en} has {a} apples and buys {b} more. How many apples does {name_en} have now?", "", f"{name_en} has {c} apples."))
            else:
                forms.append((f"{name_en} had {a} books and gave {b} to a friend. How many books are left?", "", f"{c} books are left."))
        ins, inp, out = rng.choice(forms)
        return ins, inp, out, str(c)
    if family == "translate":
        w_zh, w_en = rng.choice(DICTIONARY)
        to_en = rng.random() < 0.5
        if zh:
            forms = ([("把下面的词翻译成英文。", w_zh, w_en), (f"“{w_zh}”用英文怎么说？", "", f"“{w_zh}”的英文是 {w_en}。")]
                     if to_en else
                     [("把下面的英文单词翻译成中文。", w_en, w_zh), (f"{w_en} 的中文是什么？", "", f"{w_en} 的中文是“{w_zh}”。")])
        else:
            forms = ([("Translate this Chinese word into English.", w_zh, w_en), (f"What does {w_zh} mean in English?", "", f"{w_zh} means {w_en}.")]
                     if to_en else
                     [("Translate the following word into Chinese.", w_en, w_zh), (f"What is the Chinese word for {w_en}?", "", f"The Chinese word for {w_en} is {w_zh}.")])
        ins, inp, out = rng.choice(forms)
        return ins, inp, out, (w_en if to_en else w_zh)
    if family == "department":
        s = rng.choice(SYMPTOMS)
        d_zh, d_en = DEPARTMENTS[s[3]]
        if zh:
            dur = rng.choice(ZH_DURATIONS)
            forms = [(f"我最近{dur}一直{s[1]}，应该挂哪个科？", "", f"{s[0]}建议挂{d_zh}。"),
                     ("下面的症状应该去哪个科室就诊？", s[0], d_zh),
                     (f"出现{s[0]}应该看哪个科？", "", f"应该看{d_zh}。")]
            ins, inp, out = rng.choice(forms)
            return ins, inp, out, d_zh
        dur = rng.choice(EN_DURATIONS)
        forms = [(f"I have had {s[2]} for {dur}. Which department should I visit?", "", f"For {s[2]}, visit {d_en}."),
                 ("Which hospital department treats the following symptom?", s[2], d_en),
                 (f"Where should someone with {s[2]} go in a hospital?", "", f"To the {d_en} department.")]
        ins, inp, out = rng.choice(forms)
        return ins, inp, out, d_en
    if family == "order":
        nums, srt = _three(rng)
        listed = ", ".join(map(str, nums))
        answer = ", ".join(map(str, srt))
        if zh:
            forms = [("把下面的数字从小到大排列。", listed, answer),
                     (f"把 {listed} 从小到大排列。", "", f"从小到大是 {answer}。"),
                     (f"{nums[0]}、{nums[1]}、{nums[2]} 中最大的数是几？", "", f"最大的数是 {srt[2]}。")]
        else:
            forms = [("Sort these numbers from smallest to largest.", listed, answer),
                     (f"Put {listed} in increasing order.", "", f"In increasing order: {answer}."),
                     (f"Which is the largest of {nums[0]}, {nums[1]} and {nums[2]}?", "", f"The largest is {srt[2]}.")]
        i = rng.randrange(len(forms))
        ins, inp, out = forms[i]
        return ins, inp, out, (str(srt[2]) if i == 2 else answer)
    if family == "drug":
        d = rng.choice(list(DRUGS.values()))
        if zh:
            forms = [(f"{d[0]}是做什么用的？", "", f"{d[0]}主要用于{d[2]}。"),
                     ("下面这种药有什么作用？", d[0], d[2]),
                     (f"医生为什么会开{d[0]}？", "", f"通常是为了{d[2]}。")]
            ins, inp, out = rng.choice(forms)
            return ins, inp, out, d[2]
        forms = [(f"What is {d[1]} used for?", "", f"{cap(d[1])} is used to {d[3]}."),
                 ("What does the following medicine do?", d[1], f"It is used to {d[3]}."),
                 (f"Why would a doctor prescribe {d[1]}?", "", f"Usually to {d[3]}.")]
        ins, inp, out = rng.choice(forms)
        return ins, inp, out, d[3]
    raise ValueError(family)


ALPACA_FAMILIES = {"add": 60, "sub": 50, "translate": 60, "department": 60, "order": 40, "drug": 30}


def alpaca(lang: str, seed: int) -> list[dict]:
    """About 300 Alpaca records ({instruction, input, output}) in one language."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for family, count in ALPACA_FAMILIES.items():
        made = 0
        for _ in range(100 * count):
            if made == count:
                break
            ins, inp, out, _ = alpaca_task(rng, lang, family)
            if (ins, inp) in seen:
                continue
            seen.add((ins, inp))
            rows.append({"instruction": ins, "input": inp, "output": out})
            made += 1
        if made < count:
            raise RuntimeError(f"alpaca {lang}/{family}: only {made} distinct examples, wanted {count}")
    rng.shuffle(rows)
    return rows


def _chat_arith(rng: random.Random, zh: bool, turns: int) -> list[dict]:
    op = rng.choice("+-")
    a, b, value = _arith(rng, op)
    if zh:
        conv = [{"human": f"{a} {'加' if op == '+' else '减'} {b} 等于多少？", "assistant": f"等于 {value}。"}]
    else:
        conv = [{"human": f"What is {a} {'plus' if op == '+' else 'minus'} {b}?", "assistant": f"It is {value}."}]
    for _ in range(turns - 1):
        if value >= 30 or (value > 3 and rng.random() < 0.5):
            k = rng.randint(1, min(value, 9))
            value -= k
            conv.append({"human": f"再减 {k} 呢？", "assistant": f"等于 {value}。"} if zh else
                        {"human": f"And if you take away {k}?", "assistant": f"Then it is {value}."})
        else:
            k = rng.randint(1, 9)
            value += k
            conv.append({"human": f"再加 {k} 呢？", "assistant": f"等于 {value}。"} if zh else
                        {"human": f"And if you add {k} more?", "assistant": f"Then it is {value}."})
    return conv


def _chat_department(rng: random.Random, zh: bool, turns: int) -> list[dict]:
    s = rng.choice(SYMPTOMS)
    d_zh, d_en = DEPARTMENTS[s[3]]
    test = TESTS[s[5]] if s[5] else None
    drug = DRUGS[s[4]] if s[4] else None
    if zh:
        conv = [
            {"human": f"医生，我这{rng.choice(ZH_DURATIONS)}一直{s[1]}。",
             "assistant": rng.choice(["听起来挺难受的，建议尽快到医院看看。", "这种情况需要重视，最好去医院检查一下。"])},
            {"human": rng.choice(["那我应该挂哪个科？", "我该去哪个科室？"]), "assistant": f"{s[0]}建议挂{d_zh}。"},
            {"human": "需要做什么检查吗？",
             "assistant": f"医生可能会安排{test[0]}，它检查的是{test[2]}。" if test else f"具体检查要由{d_zh}的医生当面决定。"},
            {"human": "有什么药可以吃吗？",
             "assistant": f"医生可能会开{drug[0]}，它用于{drug[2]}。请遵医嘱服用。" if drug else f"用药请听{d_zh}医生的建议，不要自己乱吃药。"},
        ]
    else:
        conv = [
            {"human": f"Doctor, I have had {s[2]} for {rng.choice(EN_DURATIONS)}.",
             "assistant": rng.choice(["That sounds unpleasant; it is worth getting it checked.", "You should see a doctor about that soon."])},
            {"human": rng.choice(["Which department should I go to?", "So which department do I visit?"]), "assistant": f"For {s[2]}, go to {d_en}."},
            {"human": "Will I need any tests?",
             "assistant": f"The doctor may order {a_an(test[1])}, which measures {test[3]}." if test else f"The doctor in {d_en} will decide that in person."},
            {"human": "Is there a medicine I can take?",
             "assistant": f"The doctor may prescribe {drug[1]}, which is used to {drug[3]}. Follow the doctor's instructions." if drug else f"Please ask the doctor in {d_en} before taking any medicine."},
        ]
    return conv[:turns]


def _chat_translate(rng: random.Random, zh: bool, turns: int) -> list[dict]:
    words = rng.sample(DICTIONARY, turns)
    conv = []
    for i, (w_zh, w_en) in enumerate(words):
        if zh:
            if i == 0:
                conv.append({"human": f"“{w_zh}”的英文是什么？", "assistant": f"“{w_zh}”的英文是 {w_en}。"})
            elif i == 1:
                conv.append({"human": f"那“{w_zh}”呢？", "assistant": f"“{w_zh}”的英文是 {w_en}。"})
            else:
                conv.append({"human": f"反过来，{w_en} 是什么意思？", "assistant": f"{w_en} 的意思是“{w_zh}”。"})
        else:
            if i == 0:
                conv.append({"human": f"What is the English word for {w_zh}?", "assistant": f"{w_zh} is {w_en} in English."})
            elif i == 1:
                conv.append({"human": f"And {w_zh}?", "assistant": f"{w_zh} is {w_en}."})
            else:
                conv.append({"human": f"The other way round: what is {w_en} in Chinese?", "assistant": f"{w_en} is {w_zh} in Chinese."})
    return conv


def _chat_drug(rng: random.Random, zh: bool, turns: int) -> list[dict]:
    d1, d2 = rng.sample(list(DRUGS.values()), 2)
    if zh:
        conv = [{"human": f"{d1[0]}是做什么用的？", "assistant": f"{d1[0]}主要用于{d1[2]}。"},
                {"human": f"那{d2[0]}呢？", "assistant": f"{d2[0]}主要用于{d2[2]}。"},
                {"human": "这两种药可以一起吃吗？", "assistant": f"{d1[0]}和{d2[0]}能否同时服用，请先咨询医生或药师。"},
                {"human": "好的，谢谢。", "assistant": "不客气，祝您早日康复。"}]
    else:
        conv = [{"human": f"What is {d1[1]} used for?", "assistant": f"{cap(d1[1])} is used to {d1[3]}."},
                {"human": f"And {d2[1]}?", "assistant": f"{cap(d2[1])} is used to {d2[3]}."},
                {"human": "Can I take the two together?", "assistant": f"Ask a doctor or pharmacist before taking {d1[1]} and {d2[1]} together."},
                {"human": "Thanks.", "assistant": "You are welcome. Get well soon."}]
    return conv[:turns]


CHAT_KINDS = [("arithmetic", _chat_arith), ("department", _chat_department),
              ("translation", _chat_translate), ("medicine", _chat_drug)]


def conversations(seed: int = 3001, count: int = 300) -> list[dict]:
    """Multi-turn chats (2-4 turns); later turns only make sense with the earlier ones."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        category, make = rng.choice(CHAT_KINDS)
        zh = rng.random() < 0.75
        conv = make(rng, zh, rng.randint(2, 4))
        key = json.dumps(conv, ensure_ascii=False)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"conversation_id": len(rows) + 1, "category": category, "conversation": conv})
    return rows


_ZH_CURT = ["不知道。", "自己查去。", "这个问题别问我。", "随便吧。", "你自己想想。"]
_EN_CURT = ["No idea.", "Look it up yourself.", "Don't ask me.", "Whatever.", "Figure it out."]
_ZH_OFF = ["今天天气不错，适合出去散步。", "我最近在学做饭，红烧肉很好吃。", "周末我想去看一场电影。", "听音乐能让人放松。"]
_EN_OFF = ["The weather is lovely today, perfect for a walk.", "I have been learning to cook lately.",
           "I might watch a film this weekend.", "Listening to music is relaxing."]


def _wrong(rng: random.Random, family: str, answer: str, zh: bool) -> str:
    """A plausible but wrong answer of the same kind as `answer`."""
    if family in ("add", "sub"):
        value = int(answer)
        return str(max(0, value + rng.choice([-3, -2, -1, 1, 2, 3, 10])))
    if family == "department":
        names = [d[0] if zh else d[1] for d in DEPARTMENTS.values()]
        return rng.choice([n for n in names if n != answer])
    if family == "translate":
        words = [w for pair in DICTIONARY for w in pair if w != answer and (w.isascii() == answer.isascii())]
        return rng.choice(words)
    nums = [int(x) for x in answer.split(", ")]
    rng.shuffle(nums)
    if nums == sorted(nums):
        nums.reverse()
    return ", ".join(map(str, nums))


def preference_pair(rng: random.Random, zh: bool) -> dict:
    family = rng.choice(["add", "sub", "department", "translate", "order"])
    if family in ("add", "sub"):
        op = "+" if family == "add" else "-"
        a, b, c = _arith(rng, op)
        prompt = (f"{a} {'加' if op == '+' else '减'} {b} 等于多少？" if zh else
                  f"What is {a} {'plus' if op == '+' else 'minus'} {b}?")
        say = (lambda x: f"{a} {'加' if op == '+' else '减'} {b} 等于 {x}。") if zh else \
              (lambda x: f"{a} {'plus' if op == '+' else 'minus'} {b} is {x}.")
        answer = str(c)
    elif family == "department":
        s = rng.choice(SYMPTOMS)
        answer = DEPARTMENTS[s[3]][0 if zh else 1]
        if zh:
            prompt = f"我这{rng.choice(ZH_DURATIONS)}一直{s[1]}，应该挂哪个科？"
            say = lambda x: f"{s[0]}建议挂{x}就诊。"
        else:
            prompt = f"I have had {s[2]} for {rng.choice(EN_DURATIONS)}. Which department should I visit?"
            say = lambda x: f"For {s[2]}, the right department is {x}."
    elif family == "translate":
        w_zh, w_en = rng.choice(DICTIONARY)
        if rng.random() < 0.5:
            answer = w_en
            prompt = f"“{w_zh}”的英文是什么？" if zh else f"What is {w_zh} in English?"
            say = (lambda x: f"“{w_zh}”的英文是 {x}。") if zh else (lambda x: f"{w_zh} is {x} in English.")
        else:
            answer = w_zh
            prompt = f"{w_en} 的中文是什么？" if zh else f"What is the Chinese word for {w_en}?"
            say = (lambda x: f"{w_en} 的中文是“{x}”。") if zh else (lambda x: f"The Chinese word for {w_en} is {x}.")
    else:
        nums, srt = _three(rng)
        listed = ", ".join(map(str, nums))
        answer = ", ".join(map(str, srt))
        prompt = f"请把 {listed} 从小到大排列。" if zh else f"Please sort {listed} from smallest to largest."
        say = (lambda x: f"从小到大排列是 {x}。") if zh else (lambda x: f"From smallest to largest: {x}.")
    if zh:
        chosen = rng.choice(ZH_POLITE_OPEN) + say(answer) + rng.choice(ZH_POLITE_CLOSE)
    else:
        chosen = rng.choice(EN_POLITE_OPEN) + say(answer) + rng.choice(EN_POLITE_CLOSE)
    kind = rng.choices(["wrong_polite", "wrong_curt", "curt", "off_topic"], weights=[3, 2, 2.5, 2.5])[0]
    if kind == "wrong_polite":
        wrong = say(_wrong(rng, family, answer, zh))
        rejected = (rng.choice(ZH_POLITE_OPEN) + wrong + rng.choice(ZH_POLITE_CLOSE)) if zh else \
                   (rng.choice(EN_POLITE_OPEN) + wrong + rng.choice(EN_POLITE_CLOSE))
    elif kind == "wrong_curt":
        rejected = _wrong(rng, family, answer, zh) + ("。" if zh else ".")
    elif kind == "curt":
        rejected = rng.choice(_ZH_CURT if zh else _EN_CURT)
    else:
        rejected = rng.choice(_ZH_OFF if zh else _EN_OFF)
    return {"prompt": prompt, "chosen": chosen.strip(), "rejected": rejected.strip(), "answer": answer}


def preference_pairs(seed: int = 4001, count: int = 400) -> list[dict]:
    """Preference pairs: `chosen` is correct and polite, `rejected` wrong, curt or off-topic.

    `answer` (the gold string) occurs in `chosen` and never in `rejected`, so a rule-based
    (verifiable) reward can score either side.
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        row = preference_pair(rng, rng.random() < 0.6)
        if row["prompt"] in seen or row["answer"] not in row["chosen"] or row["answer"] in row["rejected"]:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows


DATASET_INFO = {
    "promptcblue_ctc": {
        "file_name": {"train": "promptcblue_ctc/train.json", "dev": "promptcblue_ctc/dev.json",
                      "test": "promptcblue_ctc/test.json"},
        "format": "promptcblue",
        "columns": {"prompt": "input", "response": "target", "choices": "answer_choices"},
        "description": "Synthetic CHIP-CTC-style classification of Chinese clinical-trial eligibility "
                       "criteria into 10 categories, in PromptCBLUE's JSON Lines format (600/110/106).",
    },
    "alpaca_zh": {
        "file_name": "alpaca_zh.json",
        "format": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        "description": "300 Chinese instructions (arithmetic, translation, which department, "
                       "ordering numbers, what a drug is for) as a JSON array in Alpaca format.",
    },
    "alpaca_en": {
        "file_name": "alpaca_en.json",
        "format": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        "description": "300 English instructions, the same task families as alpaca_zh.",
    },
    "conversations": {
        "file_name": "conversations.jsonl",
        "format": "conversation",
        "columns": {"messages": "conversation", "id": "conversation_id", "category": "category"},
        "tags": {"user": "human", "assistant": "assistant"},
        "description": "300 multi-turn chats (2-4 turns, about 75% Chinese) whose follow-up "
                       "questions need the earlier turns.",
    },
    "preference_pairs": {
        "file_name": "preference_pairs.jsonl",
        "format": "preference",
        "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "answer": "answer"},
        "description": "400 prompts with a correct, polite `chosen` and a wrong, curt or off-topic "
                       "`rejected` reply, plus the gold `answer` for verifiable rewards.",
    },
    "corpus": {
        "file_name": "corpus.txt",
        "format": "text",
        "columns": {"text": "text"},
        "description": "About 2.5 MB of declarative Chinese and English prose (one document per "
                       "line) for pretraining the stand-in model; no instruction formats.",
    },
}


# ---------------------------------------------------------------------------------------------
# The seeds' real datasets: not files here, but registered next to the synthetic ones
# ---------------------------------------------------------------------------------------------
#
# Each entry names the real data a seed document trains on, by its Hugging Face Hub id ("hf_hub_url", as in
# LLaMA-Factory's data/dataset_info.json) or, where it is not on the Hub, by where to download it ("download").
# "format" and "columns" (role -> the dataset's own column) map it to the course's formats, so that
# helpers.data.load_dataset(name) loads it online exactly like a local file; "standin" is the synthetic dataset
# of the same format that a learner uses offline. Every fact below comes from the source named in "source".

REAL_DATASET_INFO = {
    "promptcblue": {
        "download": "https://github.com/michael-wzhu/PromptCBLUE (the full data from the Tianchi platform, "
                    "after registering: https://tianchi.aliyun.com/competition/entrance/532084/introduction)",
        "format": "promptcblue",
        "columns": {"prompt": "input", "response": "target", "choices": "answer_choices", "id": "sample_id",
                    "type": "task_type", "task": "task_dataset"},
        "where": {"task_dataset": "CHIP-CTC"},
        "splits": ["train", "dev", "test"],
        "standin": "promptcblue_ctc",
        "license": "academic research only, no commercial use (the PromptCBLUE README's disclaimer)",
        "rows": "v0.1, all 16 tasks: train 68,500, dev 10,270, test A 10,270, test B 10,270",
        "seed": "the LoRA + DeepSpeed training kit",
        "source": "https://github.com/michael-wzhu/PromptCBLUE (README: statistics, fields input/target/type/"
                  "answer_choices/sample_id, licence; datasets/PromptCBLUE/toy_examples/train.json: the records "
                  "name the task type 'task_type' and carry 'task_dataset')",
        "description": "The medical LLM benchmark of the LoRA + DeepSpeed kit: 16 CBLUE tasks as prompt -> "
                       "target text. Not on the Hugging Face Hub. The course's promptcblue format is its "
                       "classification shape, so the entry keeps the CHIP-CTC rows (where); other tasks have "
                       "answer_choices null or targets outside them. The test split's targets are empty.",
    },
    "alpaca_gpt4_zh": {
        "hf_hub_url": "llamafactory/alpaca_gpt4_zh",
        "format": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        "splits": ["train"],
        "standin": "alpaca_zh",
        "license": "apache-2.0 on the Hub card; the data it is borrowed from (GPT-4-LLM) is CC BY-NC 4.0, "
                   "research use only",
        "rows": "about 52K in GPT-4-LLM, less the 6,103 mistruncated examples the Hub copy removed",
        "seed": "ChatGLM Efficient Tuning (alpaca_gpt4_zh)",
        "source": "https://github.com/hiyouga/LLaMA-Factory/blob/main/data/dataset_info.json (alpaca_gpt4_zh); "
                  "https://github.com/hiyouga/ChatGLM-Efficient-Tuning/blob/main/data/dataset_info.json "
                  "(alpaca_gpt4_zh: the file alpaca_gpt4_data_zh.json); "
                  "https://huggingface.co/datasets/llamafactory/alpaca_gpt4_zh (card: instruction, input, "
                  "output; licence); https://github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM (README: "
                  "52K, Alpaca's format, CC BY-NC 4.0)",
        "description": "Chinese Alpaca-format instructions answered by GPT-4 (prompts translated from Alpaca by "
                       "ChatGPT), as ChatGLM Efficient Tuning fine-tunes on. Its columns are the course's own.",
    },
    "comparison_gpt4_zh": {
        "download": "https://github.com/hiyouga/ChatGLM-Efficient-Tuning/tree/main/data "
                    "(comparison_gpt4_data_zh.json)",
        "file_sha1": "b99a41c1c864019d9b0c07dbcd5df0560cf33ce0",
        "format": "preference",
        "columns": {"prompt": "instruction", "chosen": "output[0]", "rejected": "output[1]"},
        "ranking": True,
        "splits": ["train"],
        "standin": "preference_pairs",
        "license": "CC BY-NC 4.0, research use only (GPT-4-LLM's data, which it comes from)",
        "seed": "ChatGLM Efficient Tuning (comparison_gpt4_zh, the reward-model data)",
        "source": "https://github.com/hiyouga/ChatGLM-Efficient-Tuning/blob/main/data/dataset_info.json "
                  "(comparison_gpt4_zh: file and sha1); its data/README.md (columns default to instruction, "
                  "input, output) and src/glmtuner/dsets/preprocess.py (pairwise: output[0] is accepted, "
                  "output[1] rejected); README (GPT-4 Generated Data: GPT-4-LLM)",
        "description": "Chinese prompts with two replies ranked by GPT-4, for the reward model. Not on the "
                       "Hugging Face Hub: a file of ChatGLM Efficient Tuning's data/ folder. Its layout differs "
                       "from the course's: output is the list [chosen, rejected], and input (appended to the "
                       "prompt by ChatGLM Efficient Tuning) stays a column of its own.",
    },
    "firefly": {
        "hf_hub_url": "YeungNLP/firefly-train-1.1M",
        "format": "alpaca",
        "columns": {"prompt": "input", "query": "", "response": "target"},
        "splits": ["train"],
        "standin": "alpaca_zh",
        "license": "none stated on the Hub card",
        "rows": "1.15M from 23 Chinese NLP tasks; 1.65M with BELLE's train_0.5M_CN added (Hub card)",
        "seed": "the QLoRA tutorial (Firefly)",
        "source": "https://github.com/hiyouga/LLaMA-Factory/blob/main/data/dataset_info.json (firefly: prompt "
                  "input, response target); https://github.com/hiyouga/ChatGLM-Efficient-Tuning/blob/main/data/"
                  "dataset_info.json (firefly: query \"\"); https://huggingface.co/datasets/YeungNLP/"
                  "firefly-train-1.1M (card: kind, input, target; rows); https://github.com/yangjianxin1/Firefly "
                  "(README)",
        "description": "Firefly's own single-turn instruction data (classical Chinese, poems, couplets, NLP "
                       "tasks). Its columns differ from the course's: input is the whole prompt, target the "
                       "reply, there is no query column (\"\"), and kind (the task) stays a column of its own.",
    },
    "moss_003_sft": {
        "hf_hub_url": "YeungNLP/moss-003-sft-data",
        "format": "conversation",
        "columns": {"messages": "conversation", "id": "conversation_id", "category": "category"},
        "tags": {"user": "human", "assistant": "assistant"},
        "splits": ["train"],
        "standin": "conversations",
        "license": "cc-by-4.0 on the original's card (fnlp/moss-003-sft-data); none stated for Firefly's copy",
        "rows": "1M+ multi-turn chats in Chinese and English (Firefly README); the original counts 1,074,551",
        "seed": "the QLoRA tutorial (Firefly's bloom-7b1 QLoRA run trains on moss + ultrachat)",
        "source": "https://github.com/yangjianxin1/Firefly (README: the data table, the format "
                  "conversation_id/category/conversation[human, assistant], firefly-bloom-7b1's training data; "
                  "data/dummy_data.jsonl: moss records also carry 'dataset'; component/dataset.py reads "
                  "turn['human'], turn['assistant']; train_args/qlora/bloom-sft-qlora.json); "
                  "https://huggingface.co/datasets/fnlp/moss-003-sft-data (card: licence, counts)",
        "description": "MOSS's multi-turn chats in Firefly's layout, the data Firefly's QLoRA runs train on. "
                       "The turn keys are the course's (human, assistant); the original fnlp/moss-003-sft-data "
                       "is in MOSS's own layout and is not this entry. The extra column dataset names the source.",
    },
}
assert not set(REAL_DATASET_INFO) & set(DATASET_INFO), "a real dataset must not reuse a synthetic dataset's name"


def build_finetuning() -> list[tuple[str, str]]:
    registry = {**DATASET_INFO, **REAL_DATASET_INFO}  # the synthetic datasets first, then the real ones
    return [
        ("alpaca_zh.json", _json_array(alpaca("zh", 5001))),
        ("alpaca_en.json", _json_array(alpaca("en", 5002))),
        ("conversations.jsonl", _jsonl(conversations())),
        ("preference_pairs.jsonl", _jsonl(preference_pairs())),
        ("dataset_info.json", json.dumps(registry, ensure_ascii=False, indent=2) + "\n"),
    ]


# ---------------------------------------------------------------------------------------------
# Writing and checking
# ---------------------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _json_array(rows: list[dict]) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"


def build(out: Path) -> list[Path]:
    """Write every dataset under `out`; return the written paths (relative to `out`)."""
    written: list[Path] = []

    def put(rel: str, text: str) -> None:
        _write_text(out / rel, text)
        written.append(Path(rel))

    put("corpus.txt", "".join(d + "\n" for d in corpus_documents()))
    for split, rows in ctc_splits().items():
        put(f"promptcblue_ctc/{split}.json", _jsonl(rows))
    for rel, text in build_finetuning():
        put(rel, text)
    return written


def check() -> int:
    """Regenerate into a temporary folder and compare with the committed files."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        for rel in build(fresh):
            committed = DATA_DIR / rel
            if not committed.exists():
                print(f"data/{rel.as_posix()}: missing (run `python data/generate.py`)")
                return 1
            if not filecmp.cmp(committed, fresh / rel, shallow=False):
                print(f"data/{rel.as_posix()}: differs from what generate.py writes "
                      "(run `python data/generate.py`)")
                return 1
    print("data/ is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder; exit 1 if a committed file differs")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where to write (default: data/)")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    for rel in build(args.out):
        path = args.out / rel
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
