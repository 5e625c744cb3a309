"""The shipped recipes (the YAML files here) and the line `lorafit recipes` prints for each."""

DESCRIPTIONS = {
    "quotes": "GPT-2 + LoRA r=8 on Abirate/english_quotes, as published (Hub; offline: model.name= and "
              "data.sources.quotes.path=, see the README)",
    "mixture8": "GPT-2 + LoRA r=8 on eight Hub datasets, 10,000 examples each, 512 tokens (needs the Hub)",
    "mixture8-offline": "mixture8 with no network: the eight sources read from local samples; needs "
                        "data.root=DIR (e.g. ../shared/data/mixture-samples); model.name: a local model, or gpt2 "
                        "in the Hugging Face cache",
    "mixture8-tasks": "mixture8 with squad, cnn_dailymail and xsum as tasks: prompt -> answer, loss on the answer "
                      "only (kind: prompt_completion); needs the Hub",
    "mixture8-tasks-offline": "mixture8-tasks with no network (squad and xsum as prompt -> answer, loss on the "
                              "answer only), on local samples; needs data.root=DIR as mixture8-offline does",
    "sentiment-dpo": "preference tuning (DPO) on Yelp reviews from the Hub: a 5-star review preferred over a 1-star "
                     "one under one prompt; train.objective=sft first, then DPO with model.adapter=THAT_RUN",
    "sentiment-dpo-offline": "sentiment-dpo with no network: pairs from the local yelp_review_full sample (positive "
                             "over negative); the recipe's path is ../shared (or set data.root=DIR); model.name: a "
                             "local model",
}
