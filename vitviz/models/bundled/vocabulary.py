"""The world the bundled shapes models know: shapes, colours, relations, the image size and
the caption vocabulary. The scene generator (:mod:`vitviz.zoo.scenes`) draws from the same lists."""

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (225, 35, 35),
    "green": (35, 175, 55),
    "blue": (40, 80, 235),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 205),
    "white": (250, 250, 250),
}
RELATIONS = ("above", "below", "left of", "right of")
IMAGE_SIZE = 64

VOCAB_WORDS = ("a", *COLOURS, *SHAPES, "above", "below", "left", "right", "of")
