"""Special token ids and placeholders of the Cheers vocabulary (Qwen2 + 5 added tokens)."""

# Placeholders the model replaces with image tokens, and the ignore label.
IMAGE_TOKEN_INDEX = -200  # <image>: an image to understand (t = 1)
IMAGE_GEN_TOKEN_INDEX = -300  # <image_gen>: an image to generate (t ~ U(0, 1) in training)
IGNORE_INDEX = -100

# Vocabulary ids.
NEWLINE_ID = 198  # "\n"
PAD_TOKEN_ID = 151643  # <|endoftext|>
CHAT_START_ID = 151644  # <|im_start|>
CHAT_END_ID = 151645  # <|im_end|>
EOS_TOKEN_ID = CHAT_END_ID
IMAGE_ID = 151665  # <image>
IMAGE_GEN_ID = 151666  # <image_gen>
IM_START_ID = 151667  # <im_start>: opens an image block
IM_END_ID = 151668  # <im_end>: closes an image block
NO_MEAN_ID = 151669  # <no_mean>: filler of CFG-unconditional prompts

# Chat roles: the first token after <|im_start|> in a turn.
SYSTEM_ID = 8948  # "system"
USER_ID = 872  # "user"
ASSISTANT_ID = 77091  # "assistant"
