"""Files written into a Hugging Face export folder as they are (remote code for transformers); XLab never imports them."""
