// Anchor translation unit for the precompiled header target.
#include "core/runtime/pch.h"
