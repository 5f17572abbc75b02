"""placeholder"""
DEFAULTS = {"geneval": dict(images_per_prompt=4, steps=80, steps_src="", cfg=9.5, cfg_src="", shift=1.0, shift_src=""),
            "dpg": dict(steps=250, steps_src="", cfg=9.5, cfg_src="", shift=0.5, shift_src="")}
